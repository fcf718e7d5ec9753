#!/usr/bin/env node
// Sends Segment-spec events (one JSON object per line) to an HTTP endpoint
// using the real Segment Node client, @segment/analytics-node.
//
// Usage:
//   node send.js --host http://127.0.0.1:PORT --write-key KEY --input events.jsonl
//                [--max-events-in-batch N] [--gzip|--no-gzip] [--path /v1/batch]
//                [--max-retries N] [--flush-interval-ms MS] [--timeout-ms MS]
//
// Prints exactly one JSON line to stdout at the end: {"sent":N,"skipped":M}
//   sent    = events accepted by the client (handed to analytics.<type>())
//   skipped = blank-free lines that were not valid JSON objects, had an unknown
//             or missing "type", or that the client rejected synchronously
//             (e.g. no userId/anonymousId); each is explained on stderr.
// Exit status: 0 on success; 1 if the client reported any 'error' event
// (delivery failure after its own retries) or the flush timed out; 2 on bad
// usage or an unreadable input file.
'use strict';

const fs = require('fs');
const zlib = require('zlib');
const { Analytics } = require('@segment/analytics-node');

function usage(msg) {
  if (msg) process.stderr.write(`send.js: ${msg}\n`);
  process.stderr.write(
    'usage: node send.js --host URL --write-key KEY --input FILE ' +
      '[--max-events-in-batch N] [--gzip|--no-gzip] [--path P] ' +
      '[--max-retries N] [--flush-interval-ms MS] [--timeout-ms MS]\n'
  );
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { gzip: false };
  const intFlag = (name, v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) usage(`${name} needs a non-negative integer, got ${v}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let val;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      val = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const next = () => {
      if (val !== undefined) return val;
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    switch (arg) {
      case '--host': opts.host = next(); break;
      case '--write-key': opts.writeKey = next(); break;
      case '--input': opts.input = next(); break;
      case '--path': opts.path = next(); break;
      case '--max-events-in-batch': opts.flushAt = intFlag(arg, next()); break;
      case '--max-retries': opts.maxRetries = intFlag(arg, next()); break;
      case '--flush-interval-ms': opts.flushInterval = intFlag(arg, next()); break;
      case '--timeout-ms': opts.timeout = intFlag(arg, next()); break;
      case '--gzip': opts.gzip = true; break;
      case '--no-gzip': opts.gzip = false; break;
      case '-h': case '--help': usage(); break;
      default: usage(`unknown argument ${arg}`);
    }
  }
  if (!opts.host) usage('--host is required');
  if (!opts.writeKey) usage('--write-key is required');
  if (!opts.input) usage('--input is required');
  if (opts.flushAt === 0) usage('--max-events-in-batch must be >= 1');
  return opts;
}

// @segment/analytics-node never compresses request bodies itself. For --gzip we
// plug in a fetch function (the client's documented `httpClient` extension
// point) that gzips the JSON body the client built and sets
// Content-Encoding: gzip. Batching, headers, body and retries stay the client's.
function gzipFetch(url, init) {
  const body = zlib.gzipSync(Buffer.from(init.body, 'utf8'));
  const headers = { ...init.headers, 'Content-Encoding': 'gzip' };
  return globalThis.fetch(url, { ...init, headers, body });
}

// Map one Segment-spec event onto the client's call for its type. Only the
// fields each call accepts are passed (anything else is not sendable through
// this client); messageId and timestamp are passed through verbatim.
const common = (e) => ({
  userId: e.userId,
  anonymousId: e.anonymousId,
  messageId: e.messageId,
  timestamp: e.timestamp,
  context: e.context,
  integrations: e.integrations,
});

const CALLS = {
  track: (a, e) => a.track({ ...common(e), event: e.event, properties: e.properties }),
  identify: (a, e) => a.identify({ ...common(e), traits: e.traits }),
  page: (a, e) =>
    a.page({ ...common(e), name: e.name, category: e.category, properties: e.properties }),
  screen: (a, e) =>
    a.screen({ ...common(e), name: e.name, category: e.category, properties: e.properties }),
  group: (a, e) => a.group({ ...common(e), groupId: e.groupId, traits: e.traits }),
  // The client's alias() takes no anonymousId.
  alias: (a, e) =>
    a.alias({
      userId: e.userId,
      previousId: e.previousId,
      messageId: e.messageId,
      timestamp: e.timestamp,
      context: e.context,
      integrations: e.integrations,
    }),
};

async function main() {
  const opts = parseArgs(process.argv.slice(2));

  let text;
  try {
    text = fs.readFileSync(opts.input, 'utf8');
  } catch (err) {
    process.stderr.write(`send.js: cannot read ${opts.input}: ${err.message}\n`);
    process.exit(2);
  }

  const settings = { writeKey: opts.writeKey, host: opts.host };
  if (opts.path !== undefined) settings.path = opts.path;
  if (opts.flushAt !== undefined) settings.flushAt = opts.flushAt;
  if (opts.maxRetries !== undefined) settings.maxRetries = opts.maxRetries;
  if (opts.flushInterval !== undefined) settings.flushInterval = opts.flushInterval;
  if (opts.gzip) settings.httpClient = gzipFetch;
  const analytics = new Analytics(settings);

  let deliveryErrors = 0;
  analytics.on('error', (err) => {
    deliveryErrors++;
    const reason = err && err.reason && err.reason.message ? err.reason.message : String(err && err.reason);
    const mid = err && err.ctx && err.ctx.event ? err.ctx.event.messageId : undefined;
    process.stderr.write(`send.js: client error (${err && err.code}) messageId=${mid}: ${reason}\n`);
  });

  let sent = 0;
  let skipped = 0;
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === '') continue; // blank lines (incl. trailing newline) are not events
    let ev;
    try {
      ev = JSON.parse(line);
    } catch (err) {
      skipped++;
      process.stderr.write(`send.js: line ${i + 1}: invalid JSON, skipped\n`);
      continue;
    }
    if (ev === null || typeof ev !== 'object' || Array.isArray(ev)) {
      skipped++;
      process.stderr.write(`send.js: line ${i + 1}: not a JSON object, skipped\n`);
      continue;
    }
    const call = Object.prototype.hasOwnProperty.call(CALLS, ev.type) ? CALLS[ev.type] : undefined;
    if (!call) {
      skipped++;
      process.stderr.write(`send.js: line ${i + 1}: unknown type ${JSON.stringify(ev.type)}, skipped\n`);
      continue;
    }
    try {
      call(analytics, ev); // the client validates synchronously and throws on bad events
      sent++;
    } catch (err) {
      skipped++;
      process.stderr.write(`send.js: line ${i + 1}: rejected by client: ${err && err.message}, skipped\n`);
    }
  }

  let timedOut = false;
  const closeOpts = opts.timeout !== undefined ? { timeout: opts.timeout } : {};
  // closeAndFlush resolves (does not reject) on timeout, aborting in-flight retries;
  // the aborted events then surface as 'error' events, so detect a timeout separately too.
  const timer =
    opts.timeout !== undefined ? setTimeout(() => { timedOut = true; }, opts.timeout) : undefined;
  await analytics.closeAndFlush(closeOpts);
  if (timer) clearTimeout(timer);

  process.stdout.write(JSON.stringify({ sent, skipped }) + '\n');
  if (deliveryErrors > 0 || timedOut) {
    process.stderr.write(
      timedOut
        ? `send.js: closeAndFlush timed out after ${opts.timeout} ms; undelivered events were aborted\n`
        : `send.js: ${deliveryErrors} delivery error(s)\n`
    );
    process.exitCode = 1;
  }
}

main().catch((err) => {
  process.stderr.write(`send.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
