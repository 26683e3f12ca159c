/** Entry point for `node dist/daemon/main-entry.js` (the systemd unit and the container run this). */
import { main } from "./main.js";

process.exit(await main(process.argv.slice(2)));
