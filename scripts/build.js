#!/usr/bin/env node
// Builds what is missing or stale before tests, benchmarks and the demo run:
//   the native addon (cmake-js; node-gyp, CPU-only, where cmake is absent) and the
//   TypeScript output in dist/.
// Flags: --native / --ts (only that part), --force (rebuild even if fresh).
// Environment: SQUEEZELM_NO_BUILD=1 skips everything (a machine that runs a carried build);
//   SQUEEZELM_CUDA=OFF builds CPU-only; SQUEEZELM_CUDA_ARCHS picks GPU generations;
//   SQUEEZELM_BUILD_DIR builds into another folder (default build/).
'use strict';
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.join(__dirname, '..');
const args = new Set(process.argv.slice(2));
const force = args.has('--force');
const only = args.has('--native') ? 'native' : args.has('--ts') ? 'ts' : 'all';

if (process.env.SQUEEZELM_NO_BUILD === '1') process.exit(0);

function newest(paths) {
  let t = 0;
  const visit = (p) => {
    let st;
    try { st = fs.statSync(p); } catch { return; }
    if (st.isDirectory()) for (const e of fs.readdirSync(p)) visit(path.join(p, e));
    else t = Math.max(t, st.mtimeMs);
  };
  paths.forEach((p) => visit(path.join(root, p)));
  return t;
}

function mtime(p) {
  try { return fs.statSync(path.join(root, p)).mtimeMs; } catch { return 0; }
}

function run(cmd, argv, env) {
  const r = spawnSync(cmd, argv, { cwd: root, stdio: 'inherit', env: { ...process.env, ...env } });
  if (r.error) throw r.error;
  if (r.status !== 0) process.exit(r.status || 1);
}

function has(cmd) {
  return spawnSync(cmd, ['--version'], { stdio: 'ignore' }).status === 0;
}

function bin(name) {
  return path.join(root, 'node_modules', '.bin', name);
}

const buildDir = process.env.SQUEEZELM_BUILD_DIR || 'build';
const addon = `${buildDir}/Release/squeezelm.node`;

if (only !== 'ts') {
  const inputs = newest(['csrc', 'CMakeLists.txt', 'binding.gyp', 'scripts/sources.js']);
  // A new or removed source file changes the list: remember it to trigger a reconfigure.
  const listFile = path.join(root, buildDir, 'sources.list');
  const list = require('./sources.js').sources('cuda').join('\n');
  let prevList = '';
  try { prevList = fs.readFileSync(listFile, 'utf8'); } catch {}
  const cudaWanted = (process.env.SQUEEZELM_CUDA || 'ON').toUpperCase() !== 'OFF';
  const flavour = `${cudaWanted ? 'cuda' : 'cpu'}:${process.env.SQUEEZELM_CUDA_ARCHS || '90a'}`;
  let prevFlavour = '';
  try { prevFlavour = fs.readFileSync(path.join(root, buildDir, 'flavour'), 'utf8'); } catch {}
  const stale = force || !mtime(addon) || mtime(addon) < inputs || prevList !== list || prevFlavour !== flavour;
  if (stale) {
    const t0 = Date.now();
    if (has('cmake')) {
      // A new flavour (or --force, or no cache) starts clean; a changed source list only needs a
      // new configure, after which the build recompiles just what changed.
      const clean = force || prevFlavour !== flavour || !fs.existsSync(path.join(root, buildDir, 'CMakeCache.txt'));
      const reconfigure = !clean && prevList !== list;
      const defs = [`--CDSQUEEZELM_CUDA=${cudaWanted ? 'ON' : 'OFF'}`];
      if (process.env.SQUEEZELM_CUDA_ARCHS) defs.push(`--CDSQUEEZELM_CUDA_ARCHS=${process.env.SQUEEZELM_CUDA_ARCHS}`);
      const jobs = String(Math.max(2, require('os').availableParallelism?.() || 2));
      console.error(`squeezelm: building the native addon (${flavour}) in ${buildDir}/ ...`);
      if (reconfigure) run(bin('cmake-js'), ['configure', '--out', buildDir, ...defs]);
      run(bin('cmake-js'), [clean ? 'rebuild' : 'build', '--out', buildDir, '--parallel', jobs, ...defs]);
    } else {
      console.error('squeezelm: cmake not found; building the CPU-only addon with node-gyp ...');
      run(bin('node-gyp'), ['rebuild', '--build_v8_with_gn=false']);
    }
    fs.mkdirSync(path.join(root, buildDir), { recursive: true });
    fs.writeFileSync(listFile, list);
    fs.writeFileSync(path.join(root, buildDir, 'flavour'), flavour);
    console.error(`squeezelm: addon built in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  }
}

if (only !== 'native') {
  const inputs = newest(['ts', 'bench', 'tsconfig.json']);
  const stamp = 'dist/.stamp';
  if (force || mtime(stamp) < inputs) {
    run(bin('tsc'), ['-p', 'tsconfig.json']);
    fs.mkdirSync(path.join(root, 'dist'), { recursive: true });
    fs.writeFileSync(path.join(root, stamp), String(Date.now()));
  }
}
