// Emits one event through outbox_emit with node-postgres, in a transaction.
// Usage: node emit.js '<json: {url, schema, commit, args}>'; prints the event id, or the
// server's error message on stderr with exit code 1.
const { Client } = require("pg");

async function main() {
  const { url, schema, commit, args, traceparent } = JSON.parse(process.argv[2]);
  const client = new Client({ connectionString: url });
  await client.connect();
  try {
    await client.query("BEGIN");
    if (traceparent) {
      await client.query("SELECT set_config('outbox.traceparent', $1, true)", [traceparent]);
    }
    const fn = `${client.escapeIdentifier(schema)}.outbox_emit`;
    const { rows } = await client.query(
      `SELECT ${fn}(aggregate_type => $1, aggregate_id => $2, type => $3, payload => $4,
                    aggregate_version => $5) AS id`,
      [args.aggregate_type, args.aggregate_id, args.type, args.payload,
       args.aggregate_version ?? null]);
    await client.query(commit ? "COMMIT" : "ROLLBACK");
    console.log(rows[0].id);
  } catch (err) {
    console.error(err.message);
    process.exitCode = 1;
  } finally {
    await client.end();
  }
}

main();
