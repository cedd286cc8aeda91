// End-to-end test of Herald's demo page (GET /) in headless Chromium.
//
// Run against a running server:
//   HERALD_URL=http://127.0.0.1:18080 node --test demo.test.mjs
// or let scripts/browser-test.sh build and start one.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { closeSync, existsSync, mkdirSync, openSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(HERE, 'artifacts');
const HERALD_URL = (process.env.HERALD_URL || '').replace(/\/+$/, '');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT = 10_000;

if (!HERALD_URL) {
  throw new Error('HERALD_URL must be set, e.g. HERALD_URL=http://127.0.0.1:18080');
}

let browser;
/** @type {Map<string, {context: import('playwright-core').BrowserContext, page: import('playwright-core').Page, logs: string[]}>} */
const clients = new Map();

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} not found: apt-get install -y chromium`);
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30_000,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-quic',
      '--no-first-run',
      '--disable-sync',
    ],
  });
});

after(async () => {
  for (const { context } of clients.values()) {
    await context.close().catch(() => {});
  }
  clients.clear();
  if (browser) await browser.close().catch(() => {});
  for (const child of children) stopChild(child);
});

// ---- processes this test starts itself (servers it stops, a Redis it kills) ----------------

/** @type {Set<import('node:child_process').ChildProcess>} */
const children = new Set();

function stopChild(child, signal = 'SIGTERM') {
  if (child.exitCode === null && child.signalCode === null) child.kill(signal);
}

/** Resolves when `child` has exited. */
function exited(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

/** A loopback port nothing listens on right now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Polls `condition` every 100 ms until it holds; throws `what` after `within` ms. */
async function until(what, condition, within = TIMEOUT) {
  const deadline = Date.now() + within;
  for (;;) {
    if (await condition().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Whether something accepts TCP connections on the loopback `port`. */
function listening(port) {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    sock.once('connect', () => { sock.destroy(); resolve(true); });
    sock.once('error', () => resolve(false));
  });
}

/** Starts `command args` and remembers it, so that it is stopped when the tests end. Its
 * output goes to artifacts/<name>-<port>.log. */
function start(command, args, port) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const log = openSync(path.join(ARTIFACTS, `${path.basename(command)}-${port}.log`), 'a');
  const child = spawn(command, args, { stdio: ['ignore', log, log] });
  closeSync(log);
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** Starts the herald binary on a free port with `flags` and waits for /healthz. */
async function startHerald(flags = []) {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = start(HERALD_BIN, ['--listen', `127.0.0.1:${port}`, ...flags], port);
  await until(`herald answers ${url}/healthz`, async () => {
    if (child.exitCode !== null) throw new Error(`herald exited with ${child.exitCode}`);
    return (await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(1000) })).ok;
  });
  return { child, url };
}

/** Starts redis-server on `port` and waits until it accepts connections. */
async function startRedis(port) {
  const child = start('redis-server', ['--bind', '127.0.0.1', '--port', String(port), '--save', '', '--appendonly', 'no'], port);
  await until(`redis-server listens on ${port}`, async () => {
    if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`);
    return listening(port);
  });
  return child;
}

/** Runs `command` in sh, as a user pasting it would, and returns its stdout. */
function shell(command, env = {}) {
  return new Promise((resolve, reject) => {
    execFile('sh', ['-c', command], { env: { ...process.env, ...env }, timeout: TIMEOUT }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${command}: ${err.message} ${stderr}`));
      else resolve(stdout);
    });
  });
}

/** An HTTP proxy on a free port in front of `target` (WebSockets included) that records
 * every HTTP request's path, status and content type. With `rewriteHost`, it sends the
 * target's own `Host` upstream (as a proxy configured with the upstream's name does), so the
 * server sees pages of the proxy's origin as another site's. */
async function recordingProxy(target, { rewriteHost = false } = {}) {
  const to = new URL(target);
  const seen = [];
  const upstreamHeaders = (headers) => (rewriteHost ? { ...headers, host: to.host } : headers);
  const server = http.createServer((req, res) => {
    const upstream = http.request(
      { host: to.hostname, port: to.port, method: req.method, path: req.url, headers: upstreamHeaders(req.headers) },
      (reply) => {
        seen.push({ url: req.url, status: reply.statusCode, type: reply.headers['content-type'] || '' });
        res.writeHead(reply.statusCode, reply.headers);
        reply.pipe(res);
      },
    );
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  server.on('upgrade', (req, socket, head) => {
    const upstream = net.connect(Number(to.port), to.hostname, () => {
      const lines = [];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const name = req.rawHeaders[i];
        const value = rewriteHost && name.toLowerCase() === 'host' ? to.host : req.rawHeaders[i + 1];
        lines.push(`${name}: ${value}`);
      }
      upstream.write(`${req.method} ${req.url} HTTP/1.1\r\n${lines.join('\r\n')}\r\n\r\n`);
      upstream.write(head);
      socket.pipe(upstream);
      upstream.pipe(socket);
    });
    upstream.on('error', () => socket.destroy());
    socket.on('error', () => upstream.destroy());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    seen,
    close: () => { server.closeAllConnections(); server.close(); },
  };
}

/** An HS256 JWT with `claims`, signed with `secret`. */
function jwt(claims, secret) {
  const part = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const signed = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${signed}.${createHmac('sha256', secret).update(signed).digest('base64url')}`;
}

// Screenshots of every open page (and its console log) when a test fails.
function withArtifacts(fn) {
  return async (t) => {
    try {
      await fn(t);
    } catch (err) {
      await saveArtifacts(t.name).catch((e) => console.error(`saving artifacts failed: ${e.message}`));
      throw err;
    }
  };
}

async function saveArtifacts(testName) {
  await mkdir(ARTIFACTS, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const safe = String(testName).replace(/[^A-Za-z0-9_-]+/g, '_').slice(0, 60);
  for (const [id, { page, logs }] of clients) {
    const base = path.join(ARTIFACTS, `${stamp}-${safe}-${id}`);
    try {
      await page.screenshot({ path: `${base}.png`, fullPage: true, timeout: TIMEOUT });
      console.error(`screenshot: ${base}.png`);
    } catch (e) {
      console.error(`screenshot of ${id} failed: ${e.message}`);
    }
    if (logs.length) {
      await writeFile(`${base}.console.txt`, logs.join('\n') + '\n').catch(() => {});
    }
  }
}

const AUTH_URL = (process.env.HERALD_AUTH_URL || '').replace(/\/+$/, '');
const AUTH_API_KEY = process.env.HERALD_AUTH_API_KEY || '';
const JWT_SECRET = process.env.HERALD_TEST_JWT_SECRET || '';
const ORIGIN_URL = (process.env.HERALD_ORIGIN_URL || '').replace(/\/+$/, '');
const HERALD_BIN = process.env.HERALD_BIN || '';

async function openClient(id, url = `${HERALD_URL}/?client_id=${encodeURIComponent(id)}`) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  context.setDefaultTimeout(TIMEOUT);
  const page = await context.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  page.on('websocket', (ws) => {
    logs.push(`[ws] open ${ws.url()}`);
    ws.on('framesent', (f) => logs.push(`[ws >] ${f.payload}`));
    ws.on('framereceived', (f) => logs.push(`[ws <] ${f.payload}`));
    ws.on('close', () => logs.push('[ws] closed'));
  });
  clients.set(id, { context, page, logs });
  const resp = await page.goto(url, {
    timeout: TIMEOUT,
    waitUntil: 'domcontentloaded',
  });
  assert.ok(resp, `no response for GET / as ${id}`);
  assert.equal(resp.status(), 200, `GET / answered ${resp.status()}`);
  return page;
}

/** Waits until `selector`'s text contains every one of `needles`. */
async function waitForText(page, selector, needles, what) {
  const list = Array.isArray(needles) ? needles : [needles];
  try {
    await page.waitForFunction(
      ([sel, ns]) => {
        const node = document.querySelector(sel);
        if (!node) return false;
        const t = node.textContent || '';
        return ns.every((n) => t.includes(n));
      },
      [selector, list],
      { timeout: TIMEOUT },
    );
  } catch (e) {
    const actual = await page.locator(selector).textContent({ timeout: 1000 }).catch(() => '<missing>');
    throw new Error(`${what}: ${selector} never contained ${JSON.stringify(list)} within ${TIMEOUT} ms; it shows ${JSON.stringify(actual)}`);
  }
}

/** Waits until some `itemSelector` element inside `listSelector` has `from` text `from` and contains `text`. */
async function waitForEntry(page, listSelector, from, text, what) {
  const entry = page
    .locator(`${listSelector} > li`)
    .filter({ has: page.locator('.from', { hasText: new RegExp(`^${escapeRe(from)}$`) }) })
    .filter({ hasText: text });
  try {
    await entry.first().waitFor({ state: 'visible', timeout: TIMEOUT });
  } catch (e) {
    const actual = await page.locator(listSelector).innerText({ timeout: 1000 }).catch(() => '<missing>');
    throw new Error(`${what}: no entry from ${from} with ${JSON.stringify(text)} in ${listSelector} within ${TIMEOUT} ms; it shows ${JSON.stringify(actual)}`);
  }
}

function escapeRe(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Joins the chat room `channel` (a channel name, exactly as typed). */
async function join(page, channel) {
  await page.locator('#room').fill(channel, { timeout: TIMEOUT });
  await page.locator('#join').click({ timeout: TIMEOUT });
  await waitForText(page, '#room-state', `Joined ${channel}`, 'join');
  assert.equal((await page.locator('#room-state').textContent()).trim(), `Joined ${channel}`);
}

async function chat(page, text) {
  await page.locator('#chat-input').fill(text, { timeout: TIMEOUT });
  await page.locator('#chat-send').click({ timeout: TIMEOUT });
}

test('the demo page serves and renders', withArtifacts(async () => {
  const res = await fetch(`${HERALD_URL}/`, { signal: AbortSignal.timeout(TIMEOUT) });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') || '', /text\/html/);
  const body = await res.text();
  for (const id of ['status', 'client-id', 'room', 'join', 'chat-input', 'chat-send', 'chat-log',
    'notifications', 'dm-to', 'dm-input', 'dm-send', 'dm-log', 'errors']) {
    assert.ok(body.includes(`id="${id}"`), `page has #${id}`);
  }
}));

test('two browsers chat, receive HTTP notifications and direct messages', withArtifacts(async () => {
  const alice = await openClient('alice');
  const bob = await openClient('bob');

  // Welcome frames.
  await waitForText(alice, '#client-id', 'alice', 'alice welcome');
  await waitForText(bob, '#client-id', 'bob', 'bob welcome');
  assert.equal((await alice.locator('#client-id').textContent()).trim(), 'alice');
  assert.equal((await bob.locator('#client-id').textContent()).trim(), 'bob');
  await waitForText(alice, '#status', 'connected', 'alice status');

  // Both join the lobby and wait for the server's "subscribed" acknowledgement.
  await join(alice, 'room:lobby');
  await join(bob, 'room:lobby');

  // Chat both ways.
  await chat(alice, 'hello from alice');
  await waitForEntry(bob, '#chat-log', 'alice', 'hello from alice', 'bob gets alice\'s chat');
  await waitForEntry(alice, '#chat-log', 'alice', 'hello from alice', 'alice sees her own chat');
  await chat(bob, 'hello from bob');
  await waitForEntry(alice, '#chat-log', 'bob', 'hello from bob', 'alice gets bob\'s chat');
  await waitForEntry(bob, '#chat-log', 'bob', 'hello from bob', 'bob sees his own chat');

  // An HTTP publish to "news" reaches both pages (they subscribe with ?channels=news).
  const res = await fetch(`${HERALD_URL}/api/publish/news`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ title: 'breaking' }),
    signal: AbortSignal.timeout(TIMEOUT),
  });
  const resBody = await res.text();
  assert.ok(res.ok, `POST /api/publish/news answered ${res.status}: ${resBody}`);
  await waitForText(alice, '#notifications', ['breaking', 'offset'], 'alice notification');
  await waitForText(bob, '#notifications', ['breaking', 'offset'], 'bob notification');
  // Rendered as pretty JSON, not as a string.
  assert.match(await bob.locator('#notifications pre.data').last().textContent(), /"title": "breaking"/);

  // A direct message from alice to bob.
  await alice.locator('#dm-to').fill('bob');
  await alice.locator('#dm-input').fill('psst bob, a secret');
  await alice.locator('#dm-send').click();
  await waitForEntry(bob, '#dm-log', 'alice', 'psst bob, a secret', 'bob gets the direct message');
  assert.equal(await bob.locator('#dm-log > li.incoming').count(), 1, 'bob has exactly one incoming DM');
  // Alice's own send is acknowledged and listed as outgoing, never as incoming.
  await waitForText(alice, '#dm-log', 'delivered to 1 connection', 'alice sees delivery acknowledgement');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(await alice.locator('#dm-log > li.incoming').count(), 0, 'alice received no incoming DM');

  // Nothing went wrong along the way.
  assert.equal(await alice.locator('#errors > li').count(), 0,
    `alice shows errors: ${await alice.locator('#errors').innerText()}`);
  assert.equal(await bob.locator('#errors > li').count(), 0,
    `bob shows errors: ${await bob.locator('#errors').innerText()}`);
}));

test('server error frames are shown in #errors and the connection stays open', withArtifacts(async () => {
  const alice = clients.get('alice')?.page ?? (await openClient('alice'));
  await waitForText(alice, '#client-id', 'alice', 'alice welcome');
  await waitForText(alice, '#status', 'connected', 'alice connected');
  const errorsBefore = await alice.locator('#errors > li').count();
  // The page leaves channel-name validation to the server: "bad room!" is invalid.
  await alice.locator('#room').fill('bad room!');
  await alice.locator('#join').click();
  await alice.locator('#errors > li').nth(errorsBefore).waitFor({ state: 'visible', timeout: TIMEOUT });
  await waitForText(alice, '#errors', 'invalid_channel', 'error frame shown');
  // Still connected, still in the lobby, and chat still works.
  assert.equal((await alice.locator('#status').textContent()).trim(), 'connected');
  await waitForText(alice, '#room-state', 'still in room:lobby', 'room kept after failed join');
  await chat(alice, 'still here');
  await waitForEntry(alice, '#chat-log', 'alice', 'still here', 'chat after error');
}));

test('HTTP broadcasts and HTTP direct messages are shown', withArtifacts(async () => {
  const alice = clients.get('alice')?.page ?? (await openClient('alice'));
  const bob = clients.get('bob')?.page ?? (await openClient('bob'));
  await waitForText(alice, '#status', 'connected', 'alice connected');
  await waitForText(bob, '#status', 'connected', 'bob connected');

  const post = async (p, body) => {
    const res = await fetch(`${HERALD_URL}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(TIMEOUT),
    });
    const text = await res.text();
    assert.ok(res.ok, `POST ${p} answered ${res.status}: ${text}`);
  };

  await post('/api/broadcast', { maintenance: 'at noon' });
  await waitForText(alice, '#notifications', ['broadcast', 'at noon'], 'alice broadcast');
  await waitForText(bob, '#notifications', ['broadcast', 'at noon'], 'bob broadcast');

  await post('/api/send/bob', { text: 'from the API' });
  await waitForEntry(bob, '#dm-log', '(HTTP API)', 'from the API', 'bob gets the API direct message');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(await alice.locator('#dm-log > li.incoming').count(), 0, 'alice received no incoming DM');
}));

test('with JWT auth, the page connects with ?token= and the token picks the client id', {
  skip: AUTH_URL ? false : 'HERALD_AUTH_URL not set (scripts/browser-test.sh sets it)',
}, withArtifacts(async () => {
  const token = (name) => process.env[`HERALD_TOKEN_${name.toUpperCase()}`];
  // ?client_id= is ignored when a token names the client.
  const alice = await openClient('auth-alice',
    `${AUTH_URL}/?client_id=mallory&token=${encodeURIComponent(token('alice'))}`);
  const bob = await openClient('auth-bob', `${AUTH_URL}/?token=${encodeURIComponent(token('bob'))}`);
  await waitForText(alice, '#client-id', 'alice', 'alice welcome');
  await waitForText(bob, '#client-id', 'bob', 'bob welcome');
  assert.equal((await alice.locator('#client-id').textContent()).trim(), 'alice');

  await join(alice, 'room:auth-room');
  await join(bob, 'room:auth-room');
  await chat(alice, 'hello with a token');
  await waitForEntry(bob, '#chat-log', 'alice', 'hello with a token', 'bob gets alice\'s chat');
}));

test('a refused WebSocket is explained by its reason', {
  skip: AUTH_URL && ORIGIN_URL && JWT_SECRET ? false : 'HERALD_AUTH_URL, HERALD_ORIGIN_URL, HERALD_TEST_JWT_SECRET not set (scripts/browser-test.sh sets them)',
}, withArtifacts(async () => {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: 'zoe', exp: now + 600, channels: ['news', 'room:*'] };
  const valid = jwt(claims, JWT_SECRET);
  // The page from another origin: a proxy that hands the server its own Host.
  const elsewhere = await recordingProxy(ORIGIN_URL, { rewriteHost: true });
  const cases = [
    // [client, url, status shown, words of the hint]
    ['refused-none', `${AUTH_URL}/`, 'token required', ['runs with JWT auth', '?token=<jwt>', 'herald token']],
    ['refused-junk', `${AUTH_URL}/?token=junk`, 'token refused', ['token_malformed']],
    ['refused-expired', `${AUTH_URL}/?token=${jwt({ ...claims, exp: now - 3600 }, JWT_SECRET)}`,
      'token expired', ['has expired', 'herald token']],
    ['refused-forged', `${AUTH_URL}/?token=${jwt(claims, `not-the-secret-${JWT_SECRET}`)}`,
      'token refused', ['token_bad_signature']],
    ['refused-no-news', `${AUTH_URL}/?token=${jwt({ ...claims, channels: ['room:*'] }, JWT_SECRET)}`,
      'channel not granted', ['does not grant the news channel']],
    // A valid token, from an origin the server does not allow: the hint is about the origin.
    ['refused-origin', `${elsewhere.url}/?token=${valid}`, 'origin not allowed',
      ['--allowed-origins', elsewhere.url]],
  ];
  for (const [id, url, reason, words] of cases) {
    const page = await openClient(id, url);
    await waitForText(page, '#errors', words, `${id}: the hint`);
    await waitForText(page, '#status', `disconnected: ${reason}`, `${id}: the status`);
    const errors = await page.locator('#errors').innerText();
    if (reason !== 'token required') {
      assert.ok(!errors.includes('runs with JWT auth'), `${id} shows the missing-token hint: ${errors}`);
    }
    assert.equal(await page.locator('#errors > li').count(), 1, `${id} explains once: ${errors}`);
    await clients.get(id).context.close();
    clients.delete(id);
  }
  elsewhere.close();
  // The same token from the server's own page connects: the refusal above was the origin's,
  // and a server with --allowed-origins still serves its own demo page.
  for (const [id, url] of [['zoe', AUTH_URL], ['zoe-listed', ORIGIN_URL]]) {
    const zoe = await openClient(id, `${url}/?token=${valid}`);
    await waitForText(zoe, '#client-id', 'zoe', `${id} welcome`);
    await waitForText(zoe, '#status', 'connected', `${id} connected`);
  }
}));

test('a server that went away is reported as unreachable', {
  skip: HERALD_BIN ? false : 'HERALD_BIN not set (scripts/browser-test.sh sets it)',
}, withArtifacts(async () => {
  const { child, url } = await startHerald();
  const page = await openClient('gone', `${url}/?client_id=gone`);
  await waitForText(page, '#status', 'connected', 'connected first');
  stopChild(child);
  await exited(child);
  await waitForText(page, '#errors', `cannot reach the server at ${url}`, 'server down explained');
  await waitForText(page, '#status', 'disconnected: server unreachable', 'status says unreachable');
  assert.ok(!(await page.locator('#errors').innerText()).includes('token'), 'no token hint');
}));

const CLUSTER_URLS = (process.env.HERALD_CLUSTER_URLS || '').split(' ').filter(Boolean);

test('cluster: two browsers on two nodes chat through Redis, and HTTP publishes reach both', {
  skip: CLUSTER_URLS.length === 2 ? false : 'HERALD_CLUSTER_URLS not set (needs redis-server)',
}, withArtifacts(async () => {
  const [nodeA, nodeB] = CLUSTER_URLS;
  const carol = await openClient('carol', `${nodeA}/?client_id=carol`);
  const dave = await openClient('dave', `${nodeB}/?client_id=dave`);
  await waitForText(carol, '#client-id', 'carol', 'carol welcome');
  await waitForText(dave, '#client-id', 'dave', 'dave welcome');

  await join(carol, 'room:cluster-room');
  await join(dave, 'room:cluster-room');
  await chat(carol, 'hello from node A');
  await waitForEntry(dave, '#chat-log', 'carol', 'hello from node A', 'dave (node B) gets carol\'s chat');
  await chat(dave, 'hello from node B');
  await waitForEntry(carol, '#chat-log', 'dave', 'hello from node B', 'carol (node A) gets dave\'s chat');

  // An HTTP publish on node A reaches the page on node B (subscribed to news on connect).
  const res = await fetch(`${nodeA}/api/publish/news`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ title: 'across the cluster' }),
    signal: AbortSignal.timeout(TIMEOUT),
  });
  assert.equal(res.status, 200, await res.text());
  await waitForText(dave, '#notifications', 'across the cluster', 'news on node B');
}));

test('loading the page gets no 404: the server serves its icon', withArtifacts(async () => {
  // Chromium fetches the icon from its browser process, which the page's network events do
  // not show: a proxy in front of the server sees every request instead.
  const proxy = await recordingProxy(HERALD_URL);
  try {
    const page = await openClient('icon', `${proxy.url}/?client_id=icon`);
    await waitForText(page, '#status', 'connected', 'connected through the proxy');
    await until('the browser asks for its icon', async () => proxy.seen.some((r) => r.url === '/favicon.ico'));
    assert.deepEqual(proxy.seen.filter((r) => r.status >= 400), [], 'no request failed');
    assert.match(proxy.seen.find((r) => r.url === '/favicon.ico').type, /^image\//);
    const size = await page.evaluate(() => new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img.naturalWidth);
      img.onerror = () => reject(new Error('the icon does not decode'));
      img.src = '/favicon.ico';
    }));
    assert.ok(size > 0, 'the icon decodes as an image');
    const errors = clients.get('icon').logs.filter((l) => l.startsWith('[error]'));
    assert.deepEqual(errors, [], 'no console error');
  } finally {
    proxy.close();
  }
}));

test('a room is the channel typed, and the curl shown for it reaches the room', withArtifacts(async () => {
  const erin = await openClient('erin', `${HERALD_URL}/?client_id=erin`);
  await waitForText(erin, '#status', 'connected', 'erin connected');
  await join(erin, 'room:2');
  const curl = (await erin.locator('#room-curl').textContent()).trim();
  assert.ok(curl.includes(`${HERALD_URL}/api/publish/room:2 `), `the curl publishes to room:2: ${curl}`);
  assert.ok(!/authorization/i.test(curl), `no API key on a server without one: ${curl}`);
  const reply = JSON.parse(await shell(curl));
  assert.equal(reply.channel, 'room:2');
  await waitForEntry(erin, '#chat-log', '(HTTP API)', 'hi from curl', 'the curl reaches the room');
  // A channel with no prefix is a room too.
  await join(erin, 'plain');
  await chat(erin, 'in plain');
  await waitForEntry(erin, '#chat-log', 'erin', 'in plain', 'chat in a channel without a prefix');
  const news = (await erin.locator('#curl-example').textContent()).trim();
  assert.ok(news.includes(`${HERALD_URL}/api/publish/news `), news);
  assert.equal(JSON.parse(await shell(news)).channel, 'news');
  await waitForText(erin, '#notifications', '"title": "hi"', 'the news curl reaches the page');
}));

test('with --api-key, the curls shown take the key from $HERALD_API_KEY', {
  skip: AUTH_URL && AUTH_API_KEY ? false : 'HERALD_AUTH_URL, HERALD_AUTH_API_KEY not set (scripts/browser-test.sh sets them)',
}, withArtifacts(async () => {
  const token = process.env.HERALD_TOKEN_ALICE;
  const page = await openClient('keyed', `${AUTH_URL}/?token=${encodeURIComponent(token)}`);
  await waitForText(page, '#status', 'connected', 'connected');
  await join(page, 'room:keyed');
  for (const selector of ['#curl-example', '#room-curl']) {
    const curl = (await page.locator(selector).textContent()).trim();
    assert.ok(curl.includes('-H "authorization: Bearer $HERALD_API_KEY"'), `${selector}: ${curl}`);
    assert.ok(!curl.includes(AUTH_API_KEY), `${selector} shows the key itself`);
  }
  assert.match(await page.locator('#curl-hint').textContent(), /HERALD_API_KEY/);
  const room = (await page.locator('#room-curl').textContent()).trim();
  await assert.rejects(shell(`${room} -f`, { HERALD_API_KEY: 'wrong' }), /401/, 'the key is checked');
  assert.equal(JSON.parse(await shell(room, { HERALD_API_KEY: AUTH_API_KEY })).channel, 'room:keyed');
  await waitForEntry(page, '#chat-log', '(HTTP API)', 'hi from curl', 'the keyed curl reaches the room');
}));

test('a 128-byte client id shows whole in the direct-message field and in the header', withArtifacts(async () => {
  const long = `long-${'x'.repeat(100)}-${'y'.repeat(18)}-end`;
  assert.equal(long.length, 128);
  const target = await openClient('long-id', `${HERALD_URL}/?client_id=${long}`);
  const sender = await openClient('long-sender', `${HERALD_URL}/?client_id=long-sender`);
  await waitForText(target, '#client-id', long, 'the long id is welcomed');
  await waitForText(sender, '#status', 'connected', 'sender connected');
  await sender.locator('#dm-to').fill(long);
  const field = await sender.locator('#dm-to').evaluate((n) => ({
    value: n.value, scrollWidth: n.scrollWidth, clientWidth: n.clientWidth,
    scrollHeight: n.scrollHeight, clientHeight: n.clientHeight,
  }));
  assert.equal(field.value, long);
  assert.ok(field.scrollWidth <= field.clientWidth, `the id fits the field's width: ${JSON.stringify(field)}`);
  assert.ok(field.scrollHeight <= field.clientHeight, `the id fits the field's height: ${JSON.stringify(field)}`);
  const header = await target.locator('#client-id').evaluate((n) => ({
    right: n.getBoundingClientRect().right, width: document.documentElement.clientWidth,
    pageWidth: document.documentElement.scrollWidth,
  }));
  assert.ok(header.right <= header.width && header.pageWidth <= header.width, `the header shows the whole id: ${JSON.stringify(header)}`);
  await sender.locator('#dm-input').fill('to the long id');
  await sender.locator('#dm-to').press('Enter');
  await waitForEntry(target, '#dm-log', 'long-sender', 'to the long id', 'Enter in the field sends');
}));

test('cluster: the status shows when the node loses Redis, and recovers', {
  skip: HERALD_BIN && spawnSync('redis-server', ['--version']).status === 0 ? false
    : 'needs HERALD_BIN (scripts/browser-test.sh sets it) and redis-server',
}, withArtifacts(async () => {
  const redisPort = await freePort();
  let redis = await startRedis(redisPort);
  const { url } = await startHerald(['--redis', `redis://127.0.0.1:${redisPort}/`]);
  await until('the node is ready', async () => (await fetch(`${url}/readyz`)).ok);
  const page = await openClient('broker', `${url}/?client_id=broker`);
  await waitForText(page, '#status', 'connected', 'connected');
  assert.equal(await page.locator('#status-box').getAttribute('data-state'), 'open');

  stopChild(redis, 'SIGKILL');
  await exited(redis);
  await waitForText(page, '#status', 'connected · broker unavailable', 'broker down shown');
  assert.equal(await page.locator('#status-box').getAttribute('data-state'), 'degraded');

  redis = await startRedis(redisPort);
  // The node reconnects with a backoff of up to 5 s, the page polls every 3 s.
  await page.waitForFunction(() => document.getElementById('status').textContent === 'connected',
    null, { timeout: 30_000 });
  assert.equal(await page.locator('#status-box').getAttribute('data-state'), 'open');
  await waitForText(page, '#notifications', 'Messages of news may have been missed', 'the gap is shown');
}));

test('an EventSource gets the events, and its own reconnect after a slow-consumer drop recovers every message once', {
  skip: HERALD_BIN ? false : 'HERALD_BIN not set (scripts/browser-test.sh sets it)',
}, withArtifacts(async () => {
  // A queue of 4 frames: a burst of publishes overflows it, and the server drops the stream.
  const { url } = await startHerald(['--queue-capacity', '4', '--history-size', '5000']);
  const publish = async (channel, body) => {
    const res = await fetch(`${url}/api/publish/${channel}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(TIMEOUT),
    });
    const text = await res.text();
    assert.equal(res.status, 200, text);
    return JSON.parse(text).offset;
  };
  const stats = async () => (await fetch(`${url}/api/stats`, { signal: AbortSignal.timeout(TIMEOUT) })).json();
  // Any page of the server's origin will do: the stream is opened by the page's own script.
  const page = await openClient('sse', `${url}/healthz`);
  await page.evaluate(() => {
    window.sse = { events: [], opens: 0, errors: 0 };
    const source = new EventSource('/sse?channels=burst,other');
    source.onopen = () => { window.sse.opens += 1; };
    source.onerror = () => { window.sse.errors += 1; };
    source.onmessage = (event) => {
      window.sse.events.push({ id: event.lastEventId, data: JSON.parse(event.data) });
    };
  });
  const seen = () => page.evaluate(() => window.sse);
  await until('the welcome arrives', async () => (await seen()).events.length === 1);
  const [welcome] = (await seen()).events;
  assert.equal(welcome.data.type, 'welcome');
  assert.ok(welcome.id, 'the welcome has an id');

  for (const n of [1, 2]) await publish('other', { other: n });
  await publish('burst', { n: 0 });
  await until('the first messages arrive', async () => (await seen()).events.length === 4);

  // Bursts of concurrent publishes until the server drops the stream as a slow consumer.
  let last = 1;
  for (let burst = 0; (await stats()).slow_consumer_drops === 0; burst += 1) {
    assert.ok(burst < 50, 'the stream was never dropped');
    const offsets = await Promise.all(Array.from({ length: 40 }, (_, i) => publish('burst', { burst, i })));
    last = Math.max(last, ...offsets);
  }
  // EventSource reconnects by itself, with the id of the last event it got in Last-Event-ID.
  await until('the browser reconnected and caught up', async () => {
    const { events, opens } = await seen();
    return opens >= 2 && events.some((e) => e.data.channel === 'burst' && e.data.offset === last);
  }, 60_000);
  const { events, opens, errors } = await seen();
  assert.ok(errors >= 1 && opens >= 2, `dropped and reopened: ${errors} errors, ${opens} opens`);
  const welcomes = events.filter((e) => e.data.type === 'welcome');
  assert.equal(welcomes.length, opens, 'a welcome per connection');
  for (const again of welcomes.slice(1)) {
    assert.deepEqual(again.data.channels.burst.recovered, true, JSON.stringify(again.data));
    assert.deepEqual(again.data.channels.other.recovered, true, JSON.stringify(again.data));
  }
  const offsets = (channel) => events.filter((e) => e.data.channel === channel).map((e) => e.data.offset);
  assert.deepEqual(offsets('other'), [1, 2], 'nothing of the other channel twice');
  assert.deepEqual(offsets('burst'), Array.from({ length: last }, (_, i) => i + 1),
    'every message of the burst channel once, in order');
  // The id: the channel list's tag, then each channel's epoch and the offset it got to.
  const { burst, other } = welcome.data.channels;
  const [, burstAt, otherAt] = events[events.length - 1].id.split('.');
  assert.deepEqual([burstAt, otherAt], [`${burst.epoch}-${last}`, `${other.epoch}-2`]);
}));
