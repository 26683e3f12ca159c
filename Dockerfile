# qbackupd in a container. It talks to QEMU through sockets mounted from the
# host, and writes backups into a mounted directory:
#   docker run -d --name qbackupd \
#     -v /run/qemu:/run/qemu \                      # QMP / guest-agent sockets of the VMs
#     -v /var/lib/qbackupd:/var/lib/qbackupd \      # state: checkpoints, domains
#     -v /srv/backups:/srv/backups \                # backup targets (list in allowDirs)
#     -v /run/qbackupd:/run/qbackupd \              # the API socket, for qbackup on the host
#     -v /etc/qbackupd:/etc/qbackupd:ro \           # config.json
#     qbackupd
# Paths must be the same inside and outside: QEMU opens the target files the
# daemon names, so mount backup directories at identical paths.

FROM node:24-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
RUN npm run build && npm prune --omit=dev

FROM node:24-bookworm-slim
# Nothing from QEMU is needed in here: QEMU formats target and scratch images itself (blockdev-create).
WORKDIR /opt/qbackupd
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY bin ./bin
COPY packaging/config.example.json /usr/share/qbackupd/config.example.json
RUN ln -s /opt/qbackupd/bin/qbackup /usr/local/bin/qbackup && ln -s /opt/qbackupd/bin/qbackupd /usr/local/bin/qbackupd
VOLUME ["/var/lib/qbackupd", "/run/qbackupd"]
ENTRYPOINT ["node", "--max-semi-space-size=1", "/opt/qbackupd/dist/daemon/main-entry.js"]
CMD ["--config", "/etc/qbackupd/config.json"]
