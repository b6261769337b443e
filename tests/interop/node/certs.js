// Test certificates for the X.509 interop tests (EC P-256, SHA-256, valid for 2 days), made
// with the openssl command line tool in a temporary directory that `cleanup()` removes.
'use strict';

const crypto = require('node:crypto');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

let workDir;

function dir() {
  if (!workDir) workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'muster-certs-node-'));
  return workDir;
}

function cleanup() {
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
  workDir = undefined;
}

function openssl(args) {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

// A certificate: a CA (self-signed unless `issuer` is given) or a device leaf (clientAuth).
function makeCert(cn, { ca, issuer } = {}) {
  const d = fs.mkdtempSync(path.join(dir(), 'c-'));
  const f = (n) => path.join(d, n);
  const ext = ca
    ? ['basicConstraints = critical, CA:TRUE', 'keyUsage = critical, keyCertSign, cRLSign, digitalSignature',
      'subjectKeyIdentifier = hash']
    : ['basicConstraints = critical, CA:FALSE', 'keyUsage = critical, digitalSignature',
      'extendedKeyUsage = clientAuth'];
  if (issuer) ext.push('authorityKeyIdentifier = keyid');
  fs.writeFileSync(f('cfg'), [
    '[req]', 'distinguished_name = dn', 'prompt = no', '[dn]', `CN = ${cn}`, '[ext]', ...ext, '',
  ].join('\n'));
  const newKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', f('key.pem')];
  if (!issuer) {
    openssl(['req', '-x509', '-new', ...newKey, '-sha256', '-days', '2', '-config', f('cfg'),
      '-extensions', 'ext', '-out', f('cert.pem')]);
  } else {
    openssl(['req', '-new', ...newKey, '-config', f('cfg'), '-out', f('csr.pem')]);
    openssl(['x509', '-req', '-in', f('csr.pem'), '-CA', issuer.certFile, '-CAkey', issuer.keyFile,
      '-set_serial', `0x${crypto.randomBytes(8).toString('hex')}`, '-sha256', '-days', '2',
      '-extfile', f('cfg'), '-extensions', 'ext', '-out', f('cert.pem')]);
  }
  const pem = fs.readFileSync(f('cert.pem'), 'utf8');
  const x = new crypto.X509Certificate(pem);
  return {
    cn,
    pem,
    key: fs.readFileSync(f('key.pem'), 'utf8'),
    certFile: f('cert.pem'),
    keyFile: f('key.pem'),
    sha256: x.fingerprint256.replace(/:/g, ''),
  };
}

module.exports = { makeCert, cleanup };
