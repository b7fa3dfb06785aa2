// Shoal's JavaScript context, run by kernel_server.py INSIDE the sandbox with Debian's nodejs.
//
// Why not a Jupyter kernel: the JavaScript kernels (ijavascript, tslab) need zeromq's native
// module, whose install downloads prebuilt binaries from outside the package registries; node's
// own REPL evaluator gives what E2B's JavaScript contexts promise (state kept across cells,
// top-level await, the last expression as the result) with nothing to install.
//
// TypeScript contexts run the same way, each cell first transpiled by the `typescript` module
// (types stripped, nothing checked: E2B's TypeScript contexts do not type-check either).
//
// Protocol (one JSON object per line): requests on stdin {"code", "env"}; replies on fd 3, so
// that what user code (or a child it spawns) writes to fd 1/2 can never forge one:
//   {"type": "stdout"|"stderr", "text"}, {"type": "result", "text"},
//   {"type": "error", "name", "value", "traceback"}, then always {"type": "done"}.
// console.* and process.stdout/stderr.write are captured synchronously, so every output of a
// cell is on fd 3 before its "done".
'use strict';

const fs = require('fs');
const readline = require('readline');
const repl = require('repl');
const util = require('util');
const { PassThrough } = require('stream');

const REPLY_FD = Number(process.argv[2] || 3);  // the reply pipe's number, given by the server
const ts = process.argv[3] === 'typescript' ? require('typescript') : null;

let busy = false;  // a cell is running; its "done" frees the runner for the next request

function send(obj) {
  fs.writeSync(REPLY_FD, JSON.stringify(obj) + '\n');
  if (obj.type === 'done') { busy = false; setImmediate(next); }
}

function capture(stream, name) {
  stream.write = (chunk, encoding, callback) => {
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    send({ type: name, text });
    if (typeof encoding === 'function') encoding();
    else if (typeof callback === 'function') callback();
    return true;
  };
}
capture(process.stdout, 'stdout');
capture(process.stderr, 'stderr');

const output = new PassThrough();
output.resume();  // the REPL's own echo of errors: not read, not kept
const server = repl.start({
  input: new PassThrough(), output, prompt: '', terminal: false,
  useGlobal: true, ignoreUndefined: true, preview: false,
});
// The REPL's eval is bound to its domain: a cell that throws (or whose awaited promise rejects)
// reaches the domain's 'error' event, not the eval callback. That event ends the running cell.
let current = null;
server._domain.on('error', (err) => { if (current) current(err); });

// Static ES module imports are not valid in a script: turn them into dynamic imports.
function rewriteImports(code) {
  return code.replace(
    /^([ \t]*)import\s+(?:([\w$]+)\s*,?\s*)?(?:\*\s+as\s+([\w$]+)|\{([^}]*)\})?\s*from\s*(['"][^'"]+['"])\s*;?/gm,
    (_m, indent, def, ns, named, source) => {
      const parts = [];
      const mod = `await import(${source})`;
      if (ns) parts.push(`const ${ns} = ${mod};`);
      if (named) {
        const fields = named.split(',').map((s) => s.trim()).filter(Boolean)
          .map((s) => s.replace(/^([\w$]+)\s+as\s+([\w$]+)$/, '$1: $2'));
        parts.push(`const { ${fields.join(', ')} } = ${mod};`);
      }
      if (def) parts.push(`const ${def} = (${mod}).default;`);
      return indent + parts.join(' ');
    },
  ).replace(/^([ \t]*)import\s+(['"][^'"]+['"])\s*;?/gm, (_m, indent, source) => `${indent}await import(${source});`);
}

function show(value) {
  return typeof value === 'string' ? value : util.inspect(value, { depth: 6, maxArrayLength: 1000 });
}

function run(request) {
  const env = request.env && typeof request.env === 'object' ? request.env : {};
  const saved = {};
  for (const [k, v] of Object.entries(env)) {
    saved[k] = Object.prototype.hasOwnProperty.call(process.env, k) ? process.env[k] : undefined;
    process.env[k] = String(v);
  }
  const finish = () => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    send({ type: 'done' });
  };
  let code = String(request.code || '');
  if (!code.trim()) { finish(); return; }
  if (ts) {
    code = ts.transpileModule(code, { reportDiagnostics: false, compilerOptions: {
      target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext } }).outputText;
  }
  code = rewriteImports(code);
  let ended = false;
  const end = (err, value) => {
    if (ended) return;  // one reply per cell, whichever way it ends
    ended = true;
    current = null;
    if (err) {
      const error = err instanceof Error ? err : new Error(String(err));
      // node's own frames (the REPL, vm) say nothing about the cell: keep the user's.
      const traceback = String(error.stack || err).split('\n').filter((l) => !/\(node:|at node:/.test(l)).join('\n');
      send({ type: 'error', name: error.name || 'Error', value: error.message || String(err), traceback });
    } else if (value !== undefined) {
      send({ type: 'result', text: show(value) });
    }
    finish();
  };
  current = end;
  server.eval(code, server.context, 'cell', end);
}

const queue = [];
function next() {
  if (busy || !queue.length) return;
  busy = true;
  try {
    run(queue.shift());
  } catch (err) {
    send({ type: 'error', name: 'Error', value: String(err), traceback: String(err && err.stack) });
    send({ type: 'done' });
  }
}

readline.createInterface({ input: process.stdin, terminal: false }).on('line', (line) => {
  let request;
  try { request = JSON.parse(line); } catch { return; }
  queue.push(request);
  next();
}).on('close', () => process.exit(0));

process.on('uncaughtException', (err) => {
  send({ type: 'stderr', text: `Uncaught ${err && err.stack ? err.stack : err}\n` });
});
process.on('unhandledRejection', (reason) => {
  send({ type: 'stderr', text: `Unhandled rejection: ${reason && reason.stack ? reason.stack : reason}\n` });
});
send({ type: 'ready' });
