// Interop peer: an express service. Unmodified by default; run with
// `node --require @opentelemetry/auto-instrumentations-node/register app.js PORT` it is
// instrumented by the OpenTelemetry Node SDK. /ok answers; /call?url=U calls U first.
const express = require('express');
const http = require('http');

const app = express();
app.get('/ok', (_req, res) => res.type('text/plain').send('express ok\n'));
app.get('/call', (req, res) => {
  http
    .get(req.query.url, (r) => {
      r.resume();
      r.on('end', () => res.type('text/plain').send(`called ${r.statusCode}\n`));
    })
    .on('error', (e) => res.status(502).send(String(e)));
});
app.listen(Number(process.argv[2]), '127.0.0.1');
