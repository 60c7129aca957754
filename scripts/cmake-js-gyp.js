#!/usr/bin/env node
// Stands in for node-gyp when prebuildify packs a release: prebuildify calls
// `<this> rebuild --target=... --devdir=... --arch=... --release`, and we build the same
// addon with cmake-js into build/Release, where prebuildify picks it up.
// The release carries machine code for 80;86;89;90a and PTX for newer GPUs unless
// SQUEEZELM_CUDA_ARCHS says otherwise.
'use strict';
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.join(__dirname, '..');
const archs = process.env.SQUEEZELM_CUDA_ARCHS || '80;86;89;90a;90-virtual';
const argv = process.argv.slice(2);
if (argv[0] !== 'rebuild') {
  console.error(`cmake-js-gyp: only 'rebuild' is supported (got ${argv.join(' ')})`);
  process.exit(2);
}
const cmakeJs = path.join(root, 'node_modules', '.bin', 'cmake-js');
const jobs = String(Math.max(2, require('os').availableParallelism?.() || 2));
const r = spawnSync(cmakeJs, ['rebuild', '--out', 'build', '--parallel', jobs, `--CDSQUEEZELM_CUDA_ARCHS=${archs}`], {
  cwd: root,
  stdio: 'inherit',
});
process.exit(r.status ?? 1);
