// End-to-end test of Herald's demo page (GET /) in headless Chromium.
//
// Run against a running server:
//   HERALD_URL=http://127.0.0.1:18080 node --test demo.test.mjs
// or let scripts/browser-test.sh build and start one.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
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
});

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

async function join(page, room) {
  await page.locator('#room').fill(room, { timeout: TIMEOUT });
  await page.locator('#join').click({ timeout: TIMEOUT });
  await waitForText(page, '#room-state', `Joined room:${room}`, 'join');
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
  await join(alice, 'lobby');
  await join(bob, 'lobby');

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
  // The page leaves channel-name validation to the server: "room:bad room!" is invalid.
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

  await join(alice, 'auth-room');
  await join(bob, 'auth-room');
  await chat(alice, 'hello with a token');
  await waitForEntry(bob, '#chat-log', 'alice', 'hello with a token', 'bob gets alice\'s chat');

  // No token: the upgrade is refused (401) and the page says why instead of failing silently.
  const anonymous = await openClient('auth-none', `${AUTH_URL}/`);
  await waitForText(anonymous, '#errors', ['refused the WebSocket', '?token='], 'refusal explained');
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

  await join(carol, 'cluster-room');
  await join(dave, 'cluster-room');
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
