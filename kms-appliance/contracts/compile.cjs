// Compiles the contracts in this directory with solc-js and writes artifacts/<Name>.json ({abi, methodIdentifiers,
// bytecode}).
// Usage: node compile.cjs <path to the solc npm package> [out dir, default ./artifacts]
// Deterministic: sources sorted, fixed settings; the Rust test `contracts_match_artifacts` reruns this and
// compares byte for byte.
'use strict';
const fs = require('fs');
const path = require('path');

const solcDir = process.argv[2];
if (!solcDir) {
  console.error('usage: node compile.cjs <solc package dir> [out dir]');
  process.exit(2);
}
const solc = require(path.resolve(solcDir));
const here = __dirname;
const outDir = path.resolve(process.argv[3] || path.join(here, 'artifacts'));
const CONTRACTS = ['AppAuth', 'KmsRegistry'];

const sources = {};
for (const f of fs.readdirSync(here).filter((f) => f.endsWith('.sol')).sort()) {
  sources[f] = { content: fs.readFileSync(path.join(here, f), 'utf8') };
}
const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.methodIdentifiers'] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(1);

fs.mkdirSync(outDir, { recursive: true });
for (const name of CONTRACTS) {
  const c = output.contracts[`${name}.sol`][name];
  const artifact = {
    contractName: name,
    compiler: `solc-js ${solc.version()}`,
    abi: c.abi,
    methodIdentifiers: c.evm.methodIdentifiers,
    bytecode: '0x' + c.evm.bytecode.object,
  };
  fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify(artifact, null, 2) + '\n');
}
console.log(`compiled ${CONTRACTS.join(', ')} with solc ${solc.version()} into ${outDir}`);
