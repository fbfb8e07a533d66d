// Drives Debian's chromium (headless) against hoard's status page for
// tests/e2e_ui.rs. Usage: node status-page.mjs BASE_URL SHOT_DIR IMAGE...
// Phase 1: the page shows the images, the hit ratio, the registry OK, works
// by keyboard and at phone width; prints "phase1 ok" and waits for a line
// on stdin (the test then makes the upstream fail). Phase 2: the page says
// the registry is failing after its next refresh; prints "phase2 ok".
// Any failed check throws: the exit status is not 0 and stderr says why.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';

const [base, shots, ...images] = process.argv.slice(2);
mkdirSync(shots, { recursive: true });
const check = (ok, what) => { if (!ok) throw new Error(`check failed: ${what}`); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // The flags TESTBED.md lists: nothing may reach past 127.0.0.0/8.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
  page.on('response', (r) => { if (r.status() >= 400) problems.push(`${r.status()} for ${r.url()}`); });
  // Only hoard's own origin is ever asked for (no CDN, works offline).
  const origins = new Set();
  page.on('request', (r) => origins.add(new URL(r.url()).origin));
  await page.goto(`${base}/ui/`);

  for (const image of images) {
    await page.locator(`#images tr[data-image="${image}"]`).waitFor({ timeout: 15000 });
  }
  const rows = await page.locator('#images tbody tr').count();
  check(rows === images.length, `${rows} image rows, expected ${images.length}`);
  const hit = await page.locator('#hit-total').textContent();
  check(/^\d+(\.\d)? %$/.test(hit), `hit ratio shown as a percentage: ${hit}`);
  const state = page.locator('#registries tr[data-registry="docker.io"] td[data-state]');
  check(await state.getAttribute('data-state') === 'ok', 'docker.io is ok');
  check((await state.textContent()).includes('OK'), 'the state is said in words');
  const platforms = await page.locator('#images tr[data-image$="/library/multi:1"] td').nth(3).textContent();
  check(platforms.includes('linux/amd64') && platforms.includes('linux/arm64'), `multi-arch platforms: ${platforms}`);
  // Largest first by default.
  const sizes = await page.locator('#images tbody tr').evaluateAll((trs) => trs.map((tr) => tr.dataset.image));
  check(sizes[0].endsWith('alpine-like:3'), `largest image first: ${sizes}`);

  // Keyboard: focus the filter, type, sort by a header from the keyboard.
  await page.locator('#filter').focus();
  await page.keyboard.type('multi');
  check(await page.locator('#images tbody tr').count() === 1, 'filter leaves one row');
  await page.keyboard.press('Control+A');
  await page.keyboard.press('Backspace');
  await page.locator('#images th[data-key="repository"] button').focus();
  await page.keyboard.press('Enter');
  check(await page.locator('#images th[data-key="repository"]').getAttribute('aria-sort') === 'ascending', 'sorted by repository from the keyboard');
  await page.screenshot({ path: `${shots}/status.png`, fullPage: true });

  // A phone: nothing wider than the screen but the tables' own scrollers.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 1, `page wider than a phone by ${overflow}px`);
  await page.screenshot({ path: `${shots}/status-phone.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });

  check([...origins].every((o) => o === base), `only hoard was asked: ${[...origins]}`);
  check(problems.length === 0, problems.join('; '));
  console.log('phase1 ok');

  const lines = createInterface({ input: process.stdin });
  const next = await lines[Symbol.asyncIterator]().next();
  check(!next.done && next.value.trim() === 'upstream down', 'told the upstream is down');
  lines.close();
  // The page's next refresh (every 5 s) says so.
  // (A locator, not waitForFunction: the page's CSP forbids eval.)
  await page.locator('#registries tr[data-registry="docker.io"] td[data-state]:not([data-state="ok"])')
    .waitFor({ timeout: 20000 });
  const said = await state.textContent();
  check(/Failing|Unreachable/.test(said), `the failure in words: ${said}`);
  check((await page.locator('#summary').textContent()).includes('attention'), 'the summary says so');
  await page.screenshot({ path: `${shots}/status-failing.png`, fullPage: true });
  check(problems.length === 0, problems.join('; '));
  console.log('phase2 ok');
} finally {
  await browser.close();
}
