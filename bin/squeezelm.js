#!/usr/bin/env node
'use strict';
const path = require('path');
const { main } = require(path.join(__dirname, '..', 'dist', 'ts', 'cli', 'main.js'));
main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
