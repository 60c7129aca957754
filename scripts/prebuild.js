#!/usr/bin/env node
// Makes prebuilds/<platform>-<arch>/node.napi.node for `npm pack` / publishing, so that
// installing the package never compiles anything.
'use strict';
const path = require('path');
const fs = require('fs');
const { spawnSync } = require('child_process');

const root = path.join(__dirname, '..');
const r = spawnSync(
  path.join(root, 'node_modules', '.bin', 'prebuildify'),
  ['--napi', '--strip', '--name', 'node.napi', '--node-gyp', path.join(root, 'scripts', 'cmake-js-gyp.js')],
  { cwd: root, stdio: 'inherit' },
);
if (r.status !== 0) process.exit(r.status ?? 1);
// The release build replaced the development build's cache; let the next build reconfigure.
fs.rmSync(path.join(root, 'build', 'flavour'), { force: true });
