#!/usr/bin/env node
// The one source list of the native addon, read by CMakeLists.txt and binding.gyp alike.
// Rule: every .cc under csrc/ is compiled; files ending in _cuda.cc and every .cu belong to
// the CUDA backend only; files ending in _nocuda.cc stand in for it in a CPU-only build.
//   node scripts/sources.js cpu-only   -> sources of a CPU-only build
//   node scripts/sources.js cuda       -> sources of a build with the CUDA backend
'use strict';
const fs = require('fs');
const path = require('path');

const root = path.join(__dirname, '..');

function walk(dir, out) {
  for (const e of fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, out);
    else out.push(path.relative(root, p).split(path.sep).join('/'));
  }
  return out;
}

function sources(kind) {
  const all = walk(path.join(root, 'csrc'), []);
  const cc = all.filter((f) => f.endsWith('.cc'));
  if (kind === 'cpu-only') return cc.filter((f) => !f.endsWith('_cuda.cc'));
  if (kind === 'cuda') return cc.filter((f) => !f.endsWith('_nocuda.cc')).concat(all.filter((f) => f.endsWith('.cu')));
  throw new Error(`unknown source kind '${kind}' (cpu-only | cuda)`);
}

module.exports = { sources };

if (require.main === module) {
  const kind = process.argv[2] || 'cpu-only';
  const sep = process.argv[3] === '--cmake' ? ';' : ' ';
  process.stdout.write(sources(kind).join(sep));
}
