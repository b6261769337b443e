// X.509 device registration with Microsoft's Node device SDKs against Muster, then the device
// on the built-in hub with the same certificate:
//   azure-iot-provisioning-device 1.9.1 (ProvisioningDeviceClient),
//   azure-iot-provisioning-device-http 1.9.1 (Http),
//   azure-iot-provisioning-device-mqtt 1.8.1 (Mqtt on 8883, MqttWs on wss://host:443/$iothub/websocket),
//   azure-iot-security-x509 1.7.12 (X509Security(registrationId, {cert, key}));
//   azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4:
//     Client.fromConnectionString('HostName=..;DeviceId=..;x509=true', Mqtt|MqttWs)
//     + setOptions({cert, key}), then sendEvent;
//   azure-iothub 1.16.6 Registry.get: the hub identity is selfSigned with the leaf's thumbprint;
//   azure-iot-provisioning-service 1.11.2: the enrollments; CA certificates through Muster's
//     service-API extension /caCertificates (plain HTTPS with the owner policy's SAS).
// Test certificates (EC P-256) are made with the openssl command line tool.
//
// Cases, on each transport: (a) individual enrollment with a self-signed leaf; (b) group whose
// signing certificate is the root, root -> leaf; (c) group with signing certificate = root,
// root -> intermediate -> leaf, the device sending leaf + intermediate (cert = both PEMs);
// (d) group on a verified CA reference. Refusals, each with its own errorCode: unverified CA
// (401011), unknown root (401002), incomplete chain (401006), CN different from the
// registration id (401007), a certificate other than the enrolled one (401009).
// X.509 version 1 device certificates (no extensions, as `openssl x509 -req` without an
// extension file and the npm `pem` package make them): (e) individual enrollment by PEM and by
// base64 DER (matched by thumbprint), (f) a v1 leaf under a group's root, each then on the hub;
// (g) a v1 certificate acting as the group's CA is refused with 401012.
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/x509.test.js
//
// All tests share that one server; every test uses its own ids.
'use strict';

const { test, describe, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const https = require('node:https');
const os = require('node:os');
const path = require('node:path');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const ProvMqtt = require('azure-iot-provisioning-device-mqtt');
const { X509Security } = require('azure-iot-security-x509');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const HubMqtt = require('azure-iot-device-mqtt');
const { Registry } = require('azure-iothub');

const CONNECTION_STRING = process.env.MUSTER_CONNECTION_STRING;
const CONNECTION_JSON = process.env.MUSTER_CONNECTION_JSON;
const HUB_CONNECTION_STRING = process.env.MUSTER_HUB_CONNECTION_STRING;
if (!CONNECTION_STRING || !CONNECTION_JSON || !HUB_CONNECTION_STRING || !process.env.NODE_EXTRA_CA_CERTS) {
  throw new Error(
    'MUSTER_CONNECTION_STRING / MUSTER_CONNECTION_JSON / MUSTER_HUB_CONNECTION_STRING / NODE_EXTRA_CA_CERTS ' +
    'are not set: run these tests through tests/interop/muster_server.py (see tests/interop/README.md)'
  );
}
const INFO = JSON.parse(fs.readFileSync(CONNECTION_JSON, 'utf8'));
const DPS_HOST = INFO.dpsHost;
const ID_SCOPE = INFO.idScope;
const EXPECTED_HUB = process.env.MUSTER_DPS_HOST || '127.0.0.2';
const HUB_API_VERSION = '2021-04-12';
const SERVICE_API_VERSION = '2021-10-01';
const TEST_TIMEOUT_MS = 60000;

const service = ProvisioningServiceClient.fromConnectionString(CONNECTION_STRING);
const registry = Registry.fromConnectionString(HUB_CONNECTION_STRING);

// Provisioning transport, and the hub transport the device then uses.
const TRANSPORTS = [
  { name: 'Http', prov: () => new Http(), hub: HubMqtt.Mqtt },
  { name: 'Mqtt', prov: () => new ProvMqtt.Mqtt(), hub: HubMqtt.Mqtt },
  { name: 'MqttWs', prov: () => new ProvMqtt.MqttWs(), hub: HubMqtt.MqttWs },
];

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

// ------------------------------------------------------------------------------------------
// test certificates (openssl CLI, EC P-256, SHA-256, valid for 2 days)
// ------------------------------------------------------------------------------------------
let WORK_DIR;
before(() => { WORK_DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'muster-x509-node-')); });
after(() => { if (WORK_DIR) fs.rmSync(WORK_DIR, { recursive: true, force: true }); });

function openssl(args) {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

// makeCert(cn, { ca, issuer }): a CA or a device leaf, shared with amqp.test.js.
const { makeCert, cleanup: cleanupCerts } = require('./certs');
after(cleanupCerts);

// An X.509 version 1 certificate: `openssl x509 -req` with no extension file, self-signed or
// signed by `issuer` (the way the npm `pem` package and many device makers create them).
function makeV1Cert(cn, { issuer } = {}) {
  const dir = fs.mkdtempSync(path.join(WORK_DIR, 'v1-'));
  const f = (n) => path.join(dir, n);
  openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', f('key.pem'), '-subj', `/CN=${cn}`, '-out', f('csr.pem')]);
  const signer = issuer ? ['-CA', issuer.certFile, '-CAkey', issuer.keyFile] : ['-key', f('key.pem')];
  openssl(['x509', '-req', '-in', f('csr.pem'), ...signer,
    '-set_serial', `0x${crypto.randomBytes(8).toString('hex')}`, '-sha256', '-days', '2', '-out', f('cert.pem')]);
  const text = execFileSync('openssl', ['x509', '-in', f('cert.pem'), '-noout', '-text'], { encoding: 'utf8' });
  assert.match(text, /Version: 1 \(0x0\)/, text);
  const pem = fs.readFileSync(f('cert.pem'), 'utf8');
  const x = new crypto.X509Certificate(pem);
  return {
    cn,
    pem,
    der: x.raw,
    key: fs.readFileSync(f('key.pem'), 'utf8'),
    certFile: f('cert.pem'),
    keyFile: f('key.pem'),
    sha256: x.fingerprint256.replace(/:/g, ''),
  };
}

// ------------------------------------------------------------------------------------------
// service side
// ------------------------------------------------------------------------------------------
function connectionStringParts(cs) {
  return Object.fromEntries(cs.split(';').map((p) => {
    const i = p.indexOf('=');
    return [p.slice(0, i), p.slice(i + 1)];
  }));
}

// A service SAS token (sr = URL-encoded host, skn = policy), computed here.
function sasToken(cs) {
  const { HostName, SharedAccessKeyName, SharedAccessKey } = connectionStringParts(cs);
  const se = Math.floor(Date.now() / 1000) + 600;
  const sr = encodeURIComponent(HostName);
  const sig = crypto.createHmac('sha256', Buffer.from(SharedAccessKey, 'base64'))
    .update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=${SharedAccessKeyName}`;
}

function restCall(cs, method, urlPath, body) {
  const host = connectionStringParts(cs).HostName;
  const data = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = https.request({
      host, port: 443, method, path: urlPath,
      headers: {
        Authorization: sasToken(cs),
        ...(data === undefined ? {} : { 'Content-Type': 'application/json' }),
      },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json;
        try { json = JSON.parse(text); } catch (_) { json = undefined; }
        resolve({ status: res.statusCode, text, json });
      });
    });
    req.on('error', reject);
    req.end(data);
  });
}

const caApi = (method, suffix, body) =>
  restCall(CONNECTION_STRING, method, `/caCertificates/${suffix}?api-version=${SERVICE_API_VERSION}`, body);

async function uploadCa(name, ca) {
  const r = await caApi('PUT', encodeURIComponent(name), { certificate: ca.pem });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.name, name, r.text);
  assert.equal(r.json.isVerified, false, r.text);
  assert.equal(r.json.info.sha256Thumbprint, ca.sha256, r.text);
}

// Proof of possession: a verification code, then a certificate with CN = code signed by the CA.
async function verifyCa(name, ca) {
  let r = await caApi('POST', `${encodeURIComponent(name)}/verificationCode`);
  assert.equal(r.status, 200, r.text);
  const code = r.json.verificationCode;
  assert.ok(typeof code === 'string' && code.length > 0, r.text);
  const proof = makeCert(code, { issuer: ca });
  r = await caApi('POST', `${encodeURIComponent(name)}/verify`, { certificate: proof.pem });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.isVerified, true, r.text);
}

// `certificate` defaults to the leaf's PEM (base64 DER is accepted too).
async function createIndividual(leaf, certificate = leaf.pem) {
  const { responseBody } = await service.createOrUpdateIndividualEnrollment({
    registrationId: leaf.cn,
    attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate } } } },
  });
  assert.equal(responseBody.attestation.type, 'x509', JSON.stringify(responseBody));
  return responseBody;
}

async function createGroup(groupId, x509) {
  const { responseBody } = await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: groupId,
    attestation: { type: 'x509', x509 },
  });
  assert.equal(responseBody.attestation.type, 'x509', JSON.stringify(responseBody));
}

const signingGroup = (groupId, signer) =>
  createGroup(groupId, { signingCertificates: { primary: { certificate: signer.pem } } });
const caReferenceGroup = (groupId, caName) =>
  createGroup(groupId, { caReferences: { primary: caName } });

// ------------------------------------------------------------------------------------------
// device side
// ------------------------------------------------------------------------------------------
// register() as a device application does; `cert` may hold leaf + intermediates (PEM).
async function register(transport, registrationId, cert, key) {
  const security = new X509Security(registrationId, { cert, key });
  const client = ProvisioningDeviceClient.create(DPS_HOST, ID_SCOPE, transport, security);
  const t0 = process.hrtime.bigint();
  const result = await client.register(); // disconnects its transport itself
  return { result, ms: Number(process.hrtime.bigint() - t0) / 1e6 };
}

// The answer's registrationState: assigned, device id = CN, and its x509 section (leaf info;
// for groups the group id and the signing certificate's info).
function assertAssigned(result, leaf, groupId, signer) {
  const s = JSON.stringify(result);
  assert.equal(result.status, 'assigned', s);
  assert.equal(result.assignedHub, EXPECTED_HUB, s);
  assert.equal(result.deviceId, leaf.cn, s);
  assert.equal(result.registrationId, leaf.cn, s);
  assert.equal(result.substatus, 'initialAssignment', s);
  assert.ok(result.x509, `no x509 in the registration state: ${s}`);
  assert.equal(result.x509.certificateInfo.sha256Thumbprint, leaf.sha256, s);
  assert.equal(result.x509.certificateInfo.subjectName, `CN=${leaf.cn}`, s);
  if (groupId) {
    assert.equal(result.x509.enrollmentGroupId, groupId, s);
    assert.equal(result.x509.signingCertificateInfo.sha256Thumbprint, signer.sha256, s);
  } else {
    assert.ok(!result.x509.enrollmentGroupId, s);
  }
}

// The hub identity, then the device connects with its certificate and sends telemetry that the
// hub has stored when sendEvent calls back (PUBACK).
async function connectAndSend(t, transport, leaf, cert, result) {
  const { responseBody: device } = await registry.get(result.deviceId);
  assert.equal(device.authentication.type, 'selfSigned', JSON.stringify(device));
  assert.equal(device.authentication.x509Thumbprint.primaryThumbprint, leaf.sha256, JSON.stringify(device));
  assert.equal(device.status, 'enabled');

  const client = DeviceClient.fromConnectionString(
    `HostName=${result.assignedHub};DeviceId=${result.deviceId};x509=true`, transport.hub);
  await client.setOptions({ cert, key: leaf.key });
  const body = `x509 telemetry from ${result.deviceId} via ${transport.name}`;
  try {
    await client.open();
    const msg = new Message(body);
    msg.messageId = `${result.deviceId}-1`;
    msg.properties.add('case', 'x509');
    await client.sendEvent(msg);
  } finally {
    await client.close();
  }
  const r = await restCall(HUB_CONNECTION_STRING, 'GET',
    `/devices/${encodeURIComponent(result.deviceId)}/telemetry?api-version=${HUB_API_VERSION}&after=0&limit=10`);
  assert.equal(r.status, 200, r.text);
  assert.deepEqual(r.json.map((m) => m.body), [body], r.text);
  assert.equal(r.json[0].deviceId, result.deviceId, r.text);
  assert.equal(r.json[0].systemProperties.messageId, `${result.deviceId}-1`, r.text);
  assert.deepEqual(r.json[0].properties, { case: 'x509' }, r.text);
  t.diagnostic(`${result.deviceId}: hub ${transport.name} telemetry stored`);
}

async function expectRefused(transport, registrationId, cert, key, errorCode) {
  let err;
  try {
    const { result } = await register(transport, registrationId, cert, key);
    assert.fail(`expected register() to fail, got ${JSON.stringify(result)}`);
  } catch (e) {
    if (e instanceof assert.AssertionError) throw e;
    err = e;
  }
  // Http: azure-iot-http-base's UnauthorizedError (err.response, err.responseBody);
  // Mqtt/MqttWs: translateError(401) on the res/401 answer (err.result = the error body).
  assert.equal(err.constructor.name, 'UnauthorizedError', `got ${err && err.stack}`);
  let body;
  if (err.response) {
    assert.equal(err.response.statusCode, 401);
    body = JSON.parse(err.responseBody);
  } else {
    body = err.result;
    assert.match(err.transportObject.topic, /^\$dps\/registrations\/res\/401\/\?\$rid=/);
  }
  assert.equal(body.errorCode, errorCode, JSON.stringify(body));
  assert.ok(typeof body.message === 'string' && body.message.length > 0, JSON.stringify(body));
  const hub = await registry.get(registrationId).then(() => 'exists', (e) => e.constructor.name);
  assert.equal(hub, 'DeviceNotFoundError', `hub device for ${registrationId}: ${hub}`);
  return body;
}

// ------------------------------------------------------------------------------------------
// tests
// ------------------------------------------------------------------------------------------
describe('X.509 device registration', () => {
  for (const transport of TRANSPORTS) {
    const { name } = transport;
    const lc = name.toLowerCase();
    describe(name, () => {
      test(`${name}: individual enrollment, self-signed leaf`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
        const leaf = makeCert(unique(`node-x509-ind-${lc}`));
        await createIndividual(leaf);
        const { result, ms } = await register(transport.prov(), leaf.cn, leaf.pem, leaf.key);
        t.diagnostic(`${name} x509 individual: register() took ${ms.toFixed(0)} ms`);
        assertAssigned(result, leaf, null, null);
        await connectAndSend(t, transport, leaf, leaf.pem, result);
      });

      test(`${name}: group on the root, root -> leaf`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
        const groupId = unique(`node-x509-root-${lc}`);
        const root = makeCert(`${groupId} Root CA`, { ca: true });
        await signingGroup(groupId, root);
        const leaf = makeCert(unique(`node-x509-rl-${lc}`), { issuer: root });
        const { result, ms } = await register(transport.prov(), leaf.cn, leaf.pem, leaf.key);
        t.diagnostic(`${name} x509 root->leaf: register() took ${ms.toFixed(0)} ms`);
        assertAssigned(result, leaf, groupId, root);
        await connectAndSend(t, transport, leaf, leaf.pem, result);
      });

      test(`${name}: group on the root, root -> intermediate -> leaf, device sends leaf + intermediate`,
        { timeout: TEST_TIMEOUT_MS }, async (t) => {
          const groupId = unique(`node-x509-chain-${lc}`);
          const root = makeCert(`${groupId} Root CA`, { ca: true });
          const intermediate = makeCert(`${groupId} Intermediate CA`, { ca: true, issuer: root });
          await signingGroup(groupId, root);
          const leaf = makeCert(unique(`node-x509-ch-${lc}`), { issuer: intermediate });
          // Without the intermediate the chain does not reach the root.
          await expectRefused(transport.prov(), leaf.cn, leaf.pem, leaf.key, 401006);
          const chain = leaf.pem + intermediate.pem;
          const { result, ms } = await register(transport.prov(), leaf.cn, chain, leaf.key);
          t.diagnostic(`${name} x509 root->intermediate->leaf: register() took ${ms.toFixed(0)} ms`);
          assertAssigned(result, leaf, groupId, root);
          await connectAndSend(t, transport, leaf, chain, result);
        });

      test(`${name}: group on a verified CA reference`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
        const caName = unique(`node-ca-${lc}`);
        const ca = makeCert(`${caName} Device CA`, { ca: true });
        await uploadCa(caName, ca);
        await verifyCa(caName, ca);
        const groupId = unique(`node-x509-caref-${lc}`);
        await caReferenceGroup(groupId, caName);
        const leaf = makeCert(unique(`node-x509-cr-${lc}`), { issuer: ca });
        const { result, ms } = await register(transport.prov(), leaf.cn, leaf.pem, leaf.key);
        t.diagnostic(`${name} x509 CA reference: register() took ${ms.toFixed(0)} ms`);
        assertAssigned(result, leaf, groupId, ca);
        await connectAndSend(t, transport, leaf, leaf.pem, result);
      });

      test(`${name}: refusals, each with its own errorCode`, { timeout: TEST_TIMEOUT_MS }, async () => {
        // Unverified CA reference: a group can't name an unverified CA (400 at write time)...
        const caName = unique(`node-ca-unverified-${lc}`);
        const ca = makeCert(`${caName} Device CA`, { ca: true });
        await uploadCa(caName, ca);
        const groupId = unique(`node-x509-unverified-${lc}`);
        const refused = await restCall(
          CONNECTION_STRING, 'PUT',
          `/enrollmentGroups/${groupId}?api-version=${SERVICE_API_VERSION}`,
          { enrollmentGroupId: groupId, attestation: { type: 'x509', x509: { caReferences: { primary: caName } } } },
        );
        assert.equal(refused.status, 400, refused.text);
        assert.equal(refused.json.errorCode, 400005, refused.text);
        assert.match(refused.json.message, /not verified/, refused.text);
        // ...and once named while verified, a new (unverified) certificate under that name
        // attests no device until it is verified again.
        await verifyCa(caName, ca);
        await caReferenceGroup(groupId, caName);
        const replacement = makeCert(`${caName} Replacement CA`, { ca: true });
        const r = await caApi('PUT', encodeURIComponent(caName), { certificate: replacement.pem });
        assert.equal(r.status, 200, r.text);
        assert.equal(r.json.isVerified, false, r.text);
        const uv = makeCert(unique(`node-x509-uv-${lc}`), { issuer: replacement });
        await expectRefused(transport.prov(), uv.cn, uv.pem, uv.key, 401011);

        // A root no enrollment knows (the device sends it along).
        const stranger = makeCert('Stranger Root CA', { ca: true });
        const st = makeCert(unique(`node-x509-st-${lc}`), { issuer: stranger });
        await expectRefused(transport.prov(), st.cn, st.pem + stranger.pem, st.key, 401002);

        // CN different from the registration id.
        const leaf = makeCert(unique(`node-x509-cn-${lc}`));
        await createIndividual(leaf);
        await expectRefused(transport.prov(), `${leaf.cn}-other`, leaf.pem, leaf.key, 401007);

        // Another certificate with the enrolled CN (thumbprint mismatch).
        const impostor = makeCert(leaf.cn);
        await expectRefused(transport.prov(), leaf.cn, impostor.pem, impostor.key, 401009);
      });
    });
  }
});

describe('X.509 version 1 device certificates', () => {
  for (const transport of TRANSPORTS) {
    const { name } = transport;
    const lc = name.toLowerCase();
    describe(name, () => {
      for (const form of ['pem', 'base64-der']) {
        test(`${name}: individual enrollment (${form}), v1 self-signed leaf`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
          const leaf = makeV1Cert(unique(`node-v1-${lc}`));
          const enrolled = await createIndividual(leaf, form === 'pem' ? leaf.pem : leaf.der.toString('base64'));
          const info = enrolled.attestation.x509.clientCertificates.primary.info;
          assert.equal(info.version, 1, JSON.stringify(info));
          assert.equal(info.sha256Thumbprint, leaf.sha256, JSON.stringify(info));
          const { result, ms } = await register(transport.prov(), leaf.cn, leaf.pem, leaf.key);
          t.diagnostic(`${name} x509 v1 individual (${form}): register() took ${ms.toFixed(0)} ms`);
          assertAssigned(result, leaf, null, null);
          assert.equal(result.x509.certificateInfo.version, 1, JSON.stringify(result));
          await connectAndSend(t, transport, leaf, leaf.pem, result);
        });
      }

      test(`${name}: group on the root, root -> v1 leaf`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
        const groupId = unique(`node-v1-root-${lc}`);
        const root = makeCert(`${groupId} Root CA`, { ca: true });
        await signingGroup(groupId, root);
        const leaf = makeV1Cert(unique(`node-v1-rl-${lc}`), { issuer: root });
        const { result, ms } = await register(transport.prov(), leaf.cn, leaf.pem, leaf.key);
        t.diagnostic(`${name} x509 root->v1 leaf: register() took ${ms.toFixed(0)} ms`);
        assertAssigned(result, leaf, groupId, root);
        await connectAndSend(t, transport, leaf, leaf.pem, result);
      });

      test(`${name}: a v1 certificate as the group's CA is refused (401012)`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const groupId = unique(`node-v1-ca-${lc}`);
        const v1Ca = makeV1Cert(`${groupId} V1 CA`);
        await signingGroup(groupId, v1Ca);
        const leaf = makeV1Cert(unique(`node-v1-under-${lc}`), { issuer: v1Ca });
        const body = await expectRefused(transport.prov(), leaf.cn, leaf.pem, leaf.key, 401012);
        assert.match(body.message, /version 1/, JSON.stringify(body));
      });
    });
  }
});
