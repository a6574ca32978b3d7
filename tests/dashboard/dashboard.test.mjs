// The dashboard in a real browser: Debian's headless Chromium, driven by playwright-core,
// against the real `drover dev` binary (API, worker and scheduler in one process on SQLite).
//
// An operator logs in with a key (keyboard only), sees the queues, enqueues jobs that fail
// through the API, watches them reach the dead set on the page, finds one by its error text,
// retries it from its page and sees it succeed. Screenshots go to $DASHBOARD_ARTIFACTS
// (default tests/dashboard/artifacts).
//
// Needs: node ≥ 18, /usr/bin/chromium (or $CHROMIUM), the drover binary ($DROVER_BIN, else
// $CARGO_TARGET_DIR/debug/drover, else target/debug/drover). A missing one fails the test:
// it never skips.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '../..');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const DROVER =
  process.env.DROVER_BIN || join(process.env.CARGO_TARGET_DIR || join(repo, 'target'), 'debug', 'drover');
const ARTIFACTS = process.env.DASHBOARD_ARTIFACTS || join(here, 'artifacts');
// How long the page may take to show what the API already has (it polls every 2 s). A cap on a
// wait for state, not a timed assertion: on a slow machine the wait simply ends sooner or later.
const UNTIL = 90_000;

let dir;
let drover;
let base;
let env;
let operatorKey;
let browser;
let page;
const pageErrors = [];

function startDrover() {
  return new Promise((resolveStart, reject) => {
    const child = spawn(DROVER, ['dev'], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const fail = (why) => reject(new Error(`${why}\n--- stdout\n${out}\n--- stderr (tail)\n${err.slice(-4000)}`));
    child.on('error', (e) => fail(`cannot start ${DROVER}: ${e.message}`));
    child.on('exit', (code) => fail(`drover dev exited with ${code} before it was up`));
    child.stderr.on('data', (d) => {
      err += d;
    });
    child.stdout.on('data', (d) => {
      out += d;
      const up = out.match(/drover dev is up: (http:\/\/\S+)/);
      const key = out.match(/export DROVER_KEY=(\S+)/);
      if (up && key) {
        child.removeAllListeners('exit');
        resolveStart({ child, url: up[1], adminKey: key[1] });
      }
    });
  });
}

async function api(method, path, body, key = operatorKey) {
  const resp = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  assert.ok(resp.ok, `${method} ${path}: ${resp.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

// `drover keys create` prints the key alone on stdout.
function createKey(role, name) {
  const out = execFileSync(DROVER, ['keys', 'create', '--role', role, '--name', name], {
    cwd: dir,
    env,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return out.trim().split('\n').pop().trim();
}

const shot = (name) => page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });

before(async () => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium (scripts/test.sh does)`);
  assert.ok(existsSync(DROVER), `no drover binary at ${DROVER}: cargo build --bin drover first (or set DROVER_BIN)`);
  mkdirSync(ARTIFACTS, { recursive: true });
  dir = mkdtempSync(join(tmpdir(), 'drover-dashboard-'));
  const db = `sqlite://${join(dir, 'drover-dev.db')}`;
  env = {
    ...process.env,
    DROVER_LISTEN: '127.0.0.1:0',
    DROVER_BROKER_URL: db,
    DROVER_DATABASE_URL: db,
    DROVER_BACKUP_STORE: `file://${join(dir, 'backups')}`,
    // Two attempts, 100 ms apart: a failing job is dead within a second.
    DROVER_RETRY_MAX_ATTEMPTS: '2',
    DROVER_RETRY_INITIAL_MS: '100',
    DROVER_RETRY_JITTER: '0',
    RUST_LOG: process.env.RUST_LOG || 'warn',
  };
  const started = await startDrover();
  drover = started.child;
  base = started.url;
  // The operator logs in with an operator key, as they would in production.
  operatorKey = createKey('operator', 'dashboard-test');
  assert.match(operatorKey, /^drv_[0-9a-f]{12}_[0-9a-f]{64}$/);

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in a container: Chromium's sandbox needs user namespaces it may not have.
    args: ['--no-sandbox'],
  });
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(UNTIL);
  page.on('pageerror', (e) => pageErrors.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') pageErrors.push(`console: ${m.text()}`);
  });
});

after(async () => {
  await browser?.close();
  if (drover && drover.exitCode === null) {
    const exited = new Promise((r) => drover.once('exit', r));
    drover.kill('SIGTERM');
    await exited;
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('an operator logs in, sees failing jobs reach the dead set, finds one by its error, retries it and sees it succeed', async () => {
  // The page loads without a key and asks for one.
  const resp = await page.goto(`${base}/dashboard`);
  assert.equal(resp.status(), 200);
  assert.match(resp.headers()['content-security-policy'], /script-src 'self';/);
  await page.getByLabel('API key').waitFor();
  await shot('01-login');

  // A wrong key is refused with the API's reason, and the form stays.
  await page.getByLabel('API key').fill(`drv_000000000000_${'0'.repeat(64)}`);
  await page.keyboard.press('Enter');
  await page.locator('#login-reason', { hasText: 'Not logged in' }).waitFor();
  // Chromium logs the refused request as a console error: that one was meant.
  pageErrors.length = 0;

  // Keyboard only: type the key, press Enter.
  await page.getByLabel('API key').fill(operatorKey);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Queues' }).waitFor();
  await page.locator('tr[data-queue="default"]').waitFor();
  assert.equal(await page.evaluate(() => location.href.includes('drv_')), false, 'the key is never in the URL');
  await shot('02-queues');

  // Three jobs that fail both their attempts; each says how many attempts it fails.
  const enqueued = [];
  for (const failFirst of [2, 3, 4]) {
    const job = await api('POST', '/v1/jobs', { kind: 'sleep', payload: { ms: 0, fail_first: failFirst } });
    enqueued.push(job.id);
  }
  const first = await api('GET', `/v1/jobs/${enqueued[0]}`);
  assert.equal(first.max_attempts, 2, 'DROVER_RETRY_MAX_ATTEMPTS applies to sleep jobs');

  // The overview's dead count reaches 3, then the dead set page lists all three.
  await page.locator('tr[data-queue="default"] td[data-col="dead"]', { hasText: /^3$/ }).waitFor();
  await page.getByRole('link', { name: 'Dead set' }).click();
  for (const id of enqueued) await page.locator(`tr[data-job="${id}"]`).waitFor();
  await shot('03-dead-set');

  // The job that fails its first 3 attempts is found by its error text alone.
  await page.getByRole('link', { name: 'Search' }).click();
  await page.getByLabel('Job id, kind, payload text or error text').fill('of the first 3');
  await page.keyboard.press('Enter');
  await page.locator('#search-count', { hasText: '1 job(s) found' }).waitFor();
  const target = enqueued[1];
  const link = page.locator(`a[href="#/jobs/${target}"]`);
  assert.equal(await link.count(), 1);
  await shot('04-search');

  // Its page shows it dead with both attempts' errors; Retry puts it back with a fresh budget
  // of two attempts: attempt 3 fails again, attempt 4 succeeds.
  await link.click();
  await page.locator('#job-summary .status', { hasText: 'dead' }).waitFor();
  await page.locator('table.attempts tbody tr', { hasText: 'sleep: failing attempt 2 of the first 3' }).waitFor();
  await shot('05-job-dead');
  await page.getByRole('button', { name: 'Retry' }).click();
  await page.locator('#toast', { hasText: 'Retried' }).waitFor();
  await page.locator('#job-summary .status', { hasText: 'succeeded' }).waitFor();
  await page.locator('table.attempts tbody tr').nth(3).waitFor();
  await shot('06-job-succeeded');

  const done = await api('GET', `/v1/jobs/${target}`);
  assert.equal(done.status, 'succeeded');
  assert.equal(done.attempts, 4);
  assert.deepEqual(
    done.attempt_history.map((a) => a.outcome),
    ['failed', 'failed', 'failed', 'succeeded'],
  );

  // The other two are still dead; the dead set page shows only them.
  await page.getByRole('link', { name: 'Dead set' }).click();
  await page.locator(`tr[data-job="${enqueued[0]}"]`).waitFor();
  await page.locator(`tr[data-job="${target}"]`).waitFor({ state: 'detached' });

  // The dev process's worker is listed with its heartbeat.
  await page.getByRole('link', { name: 'Workers' }).click();
  await page.locator('tbody tr', { hasText: 'default' }).first().waitFor();
  await shot('07-workers');

  assert.deepEqual(pageErrors, [], 'no script errors and no Content-Security-Policy violations');
});

test('a key the API refuses sends the operator back to the login form with the reason', async () => {
  const viewer = createKey('viewer', 'dashboard-viewer');
  const dead = await api('GET', '/v1/queues/default/dead');
  assert.ok(dead.jobs.length > 0, 'the first test left dead jobs');
  await page.evaluate((key) => sessionStorage.setItem('drover.key', key), viewer);
  await page.goto(`${base}/dashboard#/jobs/${dead.jobs[0].id}`);
  await page.reload();
  await page.locator('#job-summary .status', { hasText: 'dead' }).waitFor();
  // A viewer may look but not retry: the API answers 403, and the page asks for another key.
  await page.getByRole('button', { name: 'Retry' }).click();
  await page.locator('#login-reason', { hasText: 'Logged out' }).waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('drover.key')), null);
  await shot('08-forbidden');
});
