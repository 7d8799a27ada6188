#!/usr/bin/env node
// The reference GPT-2 encoder for tests/test_tokenizer: the npm package gpt-3-encoder's own
// Encoder.js (installed by scripts/install-deps.sh) encodes a UTF-8 file; prints one id a line.
//
//   node gpt2_reference.js ENCODER_DIR FILE [--whole | --chunk=CHARS]
//
// Encoder.js appends each word's ids with Array.concat, which is quadratic in the number of ids
// (hours for the whole Bible), so by default the text is encoded in chunks of about 16 KiB and
// the ids concatenated. A chunk ends right after a "\n" that has a non-space character on each
// side. That is a match boundary of the pre-tokenizer regex: the "\n" is a one-character \s run,
// matched as "\n" whether or not a character follows, no other alternative extends across it, and
// the regex has no look-behind, so every chunk gives the ids the whole text gives there.
// --whole encodes the text in one call; --chunk sets the chunk size (the test checks that
// chunks change nothing).
'use strict';
const fs = require('fs');
const path = require('path');

if (process.argv.length < 4) {
    process.stderr.write('usage: node gpt2_reference.js ENCODER_DIR FILE [--whole | --chunk=N]\n');
    process.exit(2);
}
const { encode } = require(path.resolve(process.argv[2], 'Encoder.js'));
// fatal: invalid UTF-8 is an error, as it is for kd_tokenizer; ignoreBOM: a BOM is text
const text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })
    .decode(fs.readFileSync(process.argv[3]));
const opt = process.argv[4] || '';
const whole = opt === '--whole';
const CHUNK = opt.startsWith('--chunk=') ? Number(opt.slice(8)) : 16384;
if (!(CHUNK >= 1)) throw new Error(`bad option ${opt}`);
const safe = /\S\n(?=\S)/g;
const out = [];
let start = 0;
while (start < text.length) {
    let end = text.length;
    if (!whole && text.length - start > CHUNK) {
        safe.lastIndex = start + CHUNK;
        const m = safe.exec(text);
        if (m) end = m.index + 2;
    }
    for (const id of encode(text.slice(start, end))) out.push(String(id));
    start = end;
}
process.stdout.write(out.length ? out.join('\n') + '\n' : '');
