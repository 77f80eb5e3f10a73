// The chat page of `edgelm serve` (GET /) in a real browser: Debian's Chromium driven by
// playwright-core. Run by tests/web_page.rs against a live server:
//
//     node tests/web/chat_page.mjs http://127.0.0.1:PORT [API_KEY]
//
// With API_KEY the server is expected to require it: the page must ask for it (a wrong key
// first, then the right one). Screenshots go to $EDGELM_WEB_ARTIFACTS (default
// target/web-artifacts). Exits non-zero, naming the failed step, on any failure.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const [base, apiKey] = process.argv.slice(2);
if (!base) {
  console.error('usage: node chat_page.mjs http://HOST:PORT [API_KEY]');
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const artifacts = process.env.EDGELM_WEB_ARTIFACTS || path.resolve(here, '../../target/web-artifacts');
mkdirSync(artifacts, { recursive: true });

// A hung browser or server must not hang the test run.
setTimeout(() => {
  console.error('FAIL: the browser test took over 5 minutes; giving up');
  process.exit(3);
}, 300_000).unref();

const t0 = Date.now();
let browser, page, current = 'launching Chromium';
const pageErrors = [];
const foreign = [];
const log = [];

function assert(cond, message) {
  if (!cond) throw new Error(message);
}
async function step(name, fn) {
  current = name;
  const start = Date.now();
  await fn();
  console.log(`ok   ${name} (${((Date.now() - start) / 1000).toFixed(1)} s)`);
}
// Waits for fn (run in the page) to return truthy; fails saying what was awaited.
async function until(what, fn, arg, timeout = 30_000) {
  try {
    return await page.waitForFunction(fn, arg, { timeout, polling: 50 });
  } catch (e) {
    throw new Error(`timed out after ${timeout / 1000} s waiting for ${what}`);
  }
}
async function visible(selector, what, timeout = 30_000) {
  try {
    await page.locator(selector).first().waitFor({ state: 'visible', timeout });
  } catch {
    throw new Error(`timed out after ${timeout / 1000} s waiting for ${what} (${selector}) to show`);
  }
}
async function hidden(selector, what, timeout = 30_000) {
  try {
    await page.locator(selector).first().waitFor({ state: 'hidden', timeout });
  } catch {
    throw new Error(`timed out after ${timeout / 1000} s waiting for ${what} (${selector}) to go away`);
  }
}
const lastAnswer = () => page.evaluate(() => {
  const all = document.querySelectorAll('.message.assistant .content');
  return all.length ? all[all.length - 1].textContent : null;
});
const text = (selector) => page.locator(selector).first().textContent();
async function setting(id, value) {
  if (await page.locator('#settings').isHidden()) await page.click('#settings-toggle');
  await page.fill(id, value);
}
async function serverMetric(name) {
  const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  const body = await (await fetch(`${base}/metrics`, { headers })).text();
  const line = body.split('\n').find((l) => l.startsWith(name + ' '));
  assert(line, `${name} missing from /metrics`);
  return Number(line.split(' ')[1]);
}
// Sends `message` and records every length the last answer is rendered at.
async function sendWatching(message) {
  await page.evaluate(() => {
    window.__lengths = [];
    const watch = new MutationObserver(() => {
      const all = document.querySelectorAll('.message.assistant .content');
      const n = all.length ? all[all.length - 1].textContent.length : 0;
      if (window.__lengths[window.__lengths.length - 1] !== n) window.__lengths.push(n);
    });
    watch.observe(document.querySelector('#messages'), { subtree: true, childList: true, characterData: true });
  });
  await page.fill('#input', message);
  await page.press('#input', 'Enter');
  await visible('#stop', 'the Stop button while the answer streams', 10_000);
}

try {
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
      '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: base });
  page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('dialog', (d) => { pageErrors.push(`unexpected ${d.type()} dialog: ${d.message()}`); d.dismiss(); });
  page.on('request', (r) => {
    const url = r.url();
    if (!url.startsWith(base + '/') && !url.startsWith('data:')) foreign.push(url);
  });

  await step('the page loads from GET / without a key', async () => {
    const res = await page.goto(base + '/');
    assert(res.status() === 200, `GET / answered ${res.status()}`);
    assert(res.headers()['content-type'] === 'text/html; charset=utf-8', `content-type ${res.headers()['content-type']}`);
    await visible('#input', 'the message field');
  });

  if (apiKey) {
    await step('a 401 makes the page ask for the API key; a wrong key is refused', async () => {
      await visible('#api-key-input', 'the API key prompt after /v1/models answered 401');
      await page.fill('#api-key-input', 'not-the-key');
      await page.click('#api-key-save');
      await until('the wrong key to be refused',
        () => !document.querySelector('#api-key-dialog').hidden && /refused/.test(document.querySelector('#api-key-reason').textContent));
      await page.fill('#api-key-input', apiKey);
      await page.click('#api-key-save');
      await hidden('#api-key-dialog', 'the API key prompt');
      await until('the model name from /v1/models', () => document.querySelector('#model').dataset.loaded === '1');
      const stored = await page.evaluate(() => localStorage.getItem('edgelm.apiKey'));
      assert(stored === apiKey, `the key stored in localStorage is ${JSON.stringify(stored)}`);
    });
  } else {
    await step('no API key is asked for', async () => {
      await until('the model name from /v1/models', () => document.querySelector('#model').dataset.loaded === '1');
      assert(await page.locator('#api-key-dialog').isHidden(), 'the page asked for an API key');
    });
  }
  const model = await text('#model');
  console.log(`     model: ${model}`);

  await step("a server error is shown in the page and the question is given back", async () => {
    await setting('#temperature', '5');
    await page.fill('#input', 'Hello there');
    await page.press('#input', 'Enter');
    await visible('#error', 'the error banner');
    const error = await text('#error-text');
    assert(/temperature/.test(error), `the error shown is ${JSON.stringify(error)}`);
    assert(await page.inputValue('#input') === 'Hello there', 'the question was not put back in the field');
    assert(await page.locator('.message').count() === 0, 'a failed exchange stayed in the thread');
    assert(await page.locator('.conversation').count() === 0, 'a conversation with nothing answered was kept');
    assert(await page.locator('#send').isVisible(), 'Send is not back after the error');
    await page.fill('#input', '');
  });

  let first;
  await step('an answer streams in, growing, and shows tokens/s', async () => {
    await setting('#temperature', '0');
    await setting('#max-tokens', '96');
    await setting('#seed', '7');
    await page.click('#settings-toggle');
    await sendWatching('Write three sentences about the sea.');
    await hidden('#stop', 'the answer to finish (Stop button)', 60_000);
    const lengths = await page.evaluate(() => window.__lengths.filter((n) => n > 0));
    assert(lengths.length >= 3, `the answer did not grow over time; rendered lengths: ${JSON.stringify(lengths)}`);
    assert(lengths.every((n, i) => i === 0 || n >= lengths[i - 1]), `the answer shrank while streaming: ${JSON.stringify(lengths)}`);
    first = await lastAnswer();
    assert(first && first.trim().length > 0, 'the answer is empty');
    const tps = await text('#tps');
    const stats = await text('.message.assistant .stats');
    assert(/\d+ tokens · \d+\.\d tok\/s/.test(tps), `#tps shows ${JSON.stringify(tps)}`);
    assert(/\d+ tokens · \d+\.\d tok\/s/.test(stats), `the answer's stats show ${JSON.stringify(stats)}`);
    assert(await page.locator('#error').isHidden(), `an error is shown: ${await text('#error-text')}`);
    console.log(`     ${lengths.length} renders; ${stats}`);
    console.log(`     answer: ${JSON.stringify(first.slice(0, 160))}`);
  });
  await page.screenshot({ path: path.join(artifacts, 'chat-answer.png') });

  let partial;
  await step('Stop ends a long answer, keeps the partial text, and the UI is ready again', async () => {
    await page.click('#new-chat');
    assert(await page.locator('.message').count() === 0, 'New chat did not clear the thread');
    await setting('#max-tokens', '400');
    await page.click('#settings-toggle');
    await sendWatching('Write a long, detailed essay about the history of the Roman Empire, with many paragraphs.');
    await until('the long answer to reach 60 characters', () => {
      const all = document.querySelectorAll('.message.assistant .content');
      return all.length && all[all.length - 1].textContent.length >= 60;
    }, undefined, 60_000);
    assert(await page.locator('#stop').isVisible(), 'the answer ended before Stop could be pressed');
    await page.click('#stop');
    await hidden('#stop', 'the Stop button after pressing it', 5_000);
    await visible('#send', 'the Send button after stopping', 5_000);
    const atStop = await lastAnswer();
    await page.waitForTimeout(1500);
    partial = await lastAnswer();
    assert(partial === atStop, `the answer kept growing after Stop: ${atStop.length} → ${partial.length} characters`);
    assert(partial.length >= 60, `the partial answer was not kept (${partial.length} characters)`);
    const stats = await text('.message.assistant:last-child .stats');
    assert(/stopped/.test(stats), `the stopped answer's stats show ${JSON.stringify(stats)}`);
    assert(await page.isEnabled('#send') && await page.isEditable('#input'), 'the composer is not usable after Stop');
    // The server cancels the request when the browser drops the stream.
    const deadline = Date.now() + 10_000;
    while (await serverMetric('edgelm_sequences_running') !== 0) {
      assert(Date.now() < deadline, 'the server still generates 10 s after Stop');
      await new Promise((r) => setTimeout(r, 100));
    }
    console.log(`     stopped at ${partial.length} characters; ${stats}`);
  });

  await step('a reload restores both conversations and the settings', async () => {
    await page.reload();
    await visible('#input', 'the message field after the reload');
    await until('the model name after the reload', () => document.querySelector('#model').dataset.loaded === '1');
    assert(await page.locator('#api-key-dialog').isHidden(), 'the stored API key was not used after the reload');
    assert(await page.locator('.conversation').count() === 2, `${await page.locator('.conversation').count()} conversations listed, not 2`);
    const open = async (title) => {
      await page.locator('.conversation .open', { hasText: title }).click();
      await until(`the conversation "${title}" to open`, (t) => document.querySelector('.message.user .content')?.textContent.includes(t), title, 5_000);
    };
    await open('three sentences about the sea');
    assert(await lastAnswer() === first, 'the first answer is not the same after the reload');
    assert(/tok\/s/.test(await text('.message.assistant .stats')), 'the first answer lost its stats');
    await open('detailed essay about the history');
    assert(await lastAnswer() === partial, 'the stopped answer is not the same after the reload');
    await page.click('#settings-toggle');
    assert(await page.inputValue('#max-tokens') === '400', 'max tokens was not kept');
    assert(await page.inputValue('#seed') === '7', 'the seed was not kept');
    await page.click('#settings-toggle');
  });

  await step('markdown renders, with HTML escaped and not executed', async () => {
    await page.evaluate(() => {
      const answer = [
        '# Heading one',
        'Some **bold**, *italic* and `inline <b>code</b>` text.',
        '',
        '- first item',
        '- a [link](https://example.com/) and a [bad one](javascript:window.__xss=4)',
        '',
        '1. one',
        '2. two',
        '',
        '```python',
        'def greet(name):',
        '    print("<script>window.__xss = 1</script>", name)',
        '```',
        '',
        '<script>window.__xss = 2</script>',
        '<img src="x" onerror="window.__xss = 3">',
      ].join('\n');
      const convs = JSON.parse(localStorage.getItem('edgelm.conversations'));
      convs.push({
        id: 'markdown-check', title: 'Markdown check', created: Date.now(), updated: Date.now(),
        messages: [
          { id: 'm1', role: 'user', content: 'Show me <b>markdown</b> and a code block' },
          { id: 'm2', role: 'assistant', content: answer, stats: { tokens: 42, tps: 51.2, ttft: 0.05 } },
        ],
      });
      localStorage.setItem('edgelm.conversations', JSON.stringify(convs));
      localStorage.setItem('edgelm.current', 'markdown-check');
    });
    await page.reload();
    await visible('.message.assistant pre code', 'the fenced code block');
    const r = await page.evaluate(() => {
      const c = document.querySelector('.message.assistant .content');
      return {
        xss: window.__xss,
        scripts: c.querySelectorAll('script').length + document.querySelectorAll('#messages script').length,
        imgs: document.querySelectorAll('#messages img').length,
        bUser: document.querySelectorAll('.message.user b').length,
        code: c.querySelector('pre code.language-python')?.textContent,
        lang: c.querySelector('.code-lang')?.textContent,
        h1: c.querySelector('h1')?.textContent,
        strong: c.querySelector('strong')?.textContent,
        em: c.querySelector('em')?.textContent,
        inlineCode: c.querySelector('p code')?.textContent,
        ul: c.querySelectorAll('ul > li').length,
        ol: c.querySelectorAll('ol > li').length,
        links: [...c.querySelectorAll('a')].map((a) => a.getAttribute('href')),
        text: c.textContent,
      };
    });
    assert(r.xss === undefined, `markdown content ran script (window.__xss = ${r.xss})`);
    assert(r.scripts === 0 && r.imgs === 0 && r.bUser === 0, `HTML in messages became elements: ${JSON.stringify(r)}`);
    assert(r.code && r.code.includes('print("<script>window.__xss = 1</script>", name)'), `code block text: ${JSON.stringify(r.code)}`);
    assert(r.code.startsWith('def greet(name):\n    print'), `code block lost its indentation: ${JSON.stringify(r.code)}`);
    assert(r.lang === 'python', `language label ${JSON.stringify(r.lang)}`);
    assert(r.h1 === 'Heading one' && r.strong === 'bold' && r.em === 'italic', `heading/bold/italic: ${JSON.stringify(r)}`);
    assert(r.inlineCode === 'inline <b>code</b>', `inline code: ${JSON.stringify(r.inlineCode)}`);
    assert(r.ul === 2 && r.ol === 2, `lists: ${r.ul} and ${r.ol} items`);
    assert(JSON.stringify(r.links) === '["https://example.com/"]', `links: ${JSON.stringify(r.links)}`);
    assert(r.text.includes('<script>window.__xss = 2</script>') && r.text.includes('<img src="x"'), 'raw HTML is not shown as text');
    await page.click('.copy');
    await until('the copy button to confirm', () => document.querySelector('.copy').textContent === 'Copied', undefined, 5_000);
    const copied = await page.evaluate(() => navigator.clipboard.readText().catch((e) => 'unreadable: ' + e.message));
    assert(copied === r.code, `the clipboard holds ${JSON.stringify(copied)}`);
  });

  await step('screenshot', async () => {
    await page.locator('.conversation .open', { hasText: 'three sentences about the sea' }).click();
    await page.waitForTimeout(200);
    await page.screenshot({ path: path.join(artifacts, 'chat.png') });
    await page.locator('.conversation .open', { hasText: 'Markdown check' }).click();
    await page.waitForTimeout(200);
    await page.screenshot({ path: path.join(artifacts, 'chat-markdown.png') });
    await page.emulateMedia({ colorScheme: 'dark' });
    await page.screenshot({ path: path.join(artifacts, 'chat-dark.png') });
    await page.emulateMedia({ colorScheme: 'light' });
    console.log(`     saved in ${artifacts}`);
  });

  await step('a conversation is deleted (two clicks) and stays deleted', async () => {
    const row = page.locator('.conversation', { hasText: 'Markdown check' });
    await row.hover();
    await row.locator('.delete').click();
    await row.locator('.delete.armed').click();
    await until('the conversation to leave the list', () => document.querySelectorAll('.conversation').length === 2, undefined, 5_000);
    await page.reload();
    await visible('#input', 'the message field after the reload');
    assert(await page.locator('.conversation').count() === 2, 'the deleted conversation came back after a reload');
  });

  assert(pageErrors.length === 0, `errors in the page:\n  ${pageErrors.join('\n  ')}`);
  assert(foreign.length === 0, `the page requested other origins: ${foreign.join(', ')}`);
  console.log(`PASS chat page in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
} catch (e) {
  console.error(`FAIL in step "${current}": ${e.message}`);
  if (pageErrors.length) console.error(`errors in the page:\n  ${pageErrors.join('\n  ')}`);
  if (log.length) console.error(`browser console:\n  ${log.slice(-30).join('\n  ')}`);
  if (page) {
    const shot = path.join(artifacts, 'failure.png');
    await page.screenshot({ path: shot }).then(() => console.error(`screenshot: ${shot}`), () => {});
  }
  process.exitCode = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
}
