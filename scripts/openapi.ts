/** Write docs/openapi.yaml from src/api/schemas.ts (see src/api/openapi.ts). */
import { writeFileSync } from "node:fs";
import { openapiYaml } from "../src/api/openapi.js";

writeFileSync(new URL("../docs/openapi.yaml", import.meta.url), openapiYaml());
