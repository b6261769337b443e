// Device registration over AMQP with Microsoft's Node SDK against Muster (issue 16 item 1):
//   azure-iot-provisioning-device 1.9.1 (ProvisioningDeviceClient),
//   azure-iot-provisioning-device-amqp 1.9.1 (Amqp on 5671, AmqpWs on wss://host:443/$iothub/websocket
//     with the AMQPWSB10 subprotocol), on azure-iot-amqp-base 2.5.3 (rhea),
//   azure-iot-security-symmetric-key 1.8.2, azure-iot-security-x509 1.7.12.
// Enrollments are created with azure-iot-provisioning-service 1.11.2; each registration is
// followed by the hub twin check with azure-iothub 1.16.6 (the device exists in the built-in
// hub with the enrollment's initial twin).
//
// Symmetric keys go through SASL PLAIN (user {idScope}/registrations/{registrationId}, password
// the SAS token); X.509 devices open AMQP without SASL and present their certificate in TLS.
// Refusals: the registrar's error rejects the request delivery, its description the DPS error
// body (wrong key 401005, unknown ID scope 401004); a disabled enrollment is an ordinary
// answer with status `disabled`.
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/amqp.test.js
'use strict';

const { test, describe, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Amqp, AmqpWs } = require('azure-iot-provisioning-device-amqp');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Registry } = require('azure-iothub');
const { makeCert, cleanup } = require('./certs');

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
const TEST_TIMEOUT_MS = 60000;

const service = ProvisioningServiceClient.fromConnectionString(CONNECTION_STRING);
const registry = Registry.fromConnectionString(HUB_CONNECTION_STRING);

const TRANSPORTS = [
  { name: 'Amqp', make: () => new Amqp() },
  { name: 'AmqpWs', make: () => new AmqpWs() },
];

after(cleanup);

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

function deriveDeviceKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64'))
    .update(registrationId, 'utf8')
    .digest('base64');
}

function initialTwin(tag) {
  return { tags: { case: tag, site: 'amqp-lab' }, properties: { desired: { interval: 42, mode: tag } } };
}

function userProps(obj) {
  return Object.fromEntries(Object.entries(obj || {}).filter(([k]) => !k.startsWith('$')));
}

async function registerWithKey(transport, registrationId, key, idScope = ID_SCOPE) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const client = ProvisioningDeviceClient.create(DPS_HOST, idScope, transport, security);
  return client.register();
}

async function registerWithCert(transport, registrationId, cert, key) {
  const security = new X509Security(registrationId, { cert, key });
  const client = ProvisioningDeviceClient.create(DPS_HOST, ID_SCOPE, transport, security);
  return client.register();
}

function assertAssigned(result, registrationId) {
  const s = JSON.stringify(result);
  assert.equal(result.status, 'assigned', s);
  assert.equal(result.assignedHub, EXPECTED_HUB, s);
  assert.equal(result.deviceId, registrationId, s);
  assert.equal(result.registrationId, registrationId, s);
  assert.equal(result.substatus, 'initialAssignment', s);
}

// The device exists in the built-in hub with the enrollment's initial twin.
async function assertHubTwin(deviceId, twinWanted) {
  const { responseBody: twin } = await registry.getTwin(deviceId);
  assert.deepEqual(twin.tags, twinWanted.tags, JSON.stringify(twin));
  assert.deepEqual(userProps(twin.properties.desired), twinWanted.properties.desired, JSON.stringify(twin));
}

async function expectRejection(fn) {
  try {
    const result = await fn();
    assert.fail(`expected register() to fail, got ${JSON.stringify(result)}`);
  } catch (e) {
    if (e instanceof assert.AssertionError) throw e;
    return e;
  }
}

// A rejected request delivery: rhea's error, its description the DPS error body.
function dpsErrorOf(err) {
  assert.ok(err && typeof err.description === 'string', `not an AMQP rejection: ${err && (err.stack || JSON.stringify(err))}`);
  assert.equal(err.condition, 'amqp:unauthorized-access', JSON.stringify(err));
  const body = JSON.parse(err.description);
  for (const field of ['errorCode', 'trackingId', 'message', 'timestampUtc']) {
    assert.ok(body[field] !== undefined, `${field} missing: ${err.description}`);
  }
  return body;
}

describe('device registration over AMQP', () => {
  for (const { name, make } of TRANSPORTS) {
    const lc = name.toLowerCase();
    describe(name, () => {
      test(`${name}: symmetric key, individual enrollment`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const registrationId = unique(`node-amqp-ind-${lc}`);
        const twin = initialTwin(`individual-${lc}`);
        const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
          registrationId,
          attestation: { type: 'symmetricKey' },
          initialTwin: twin,
        });
        const result = await registerWithKey(make(), registrationId, created.attestation.symmetricKey.primaryKey);
        assertAssigned(result, registrationId);
        await assertHubTwin(registrationId, twin);
      });

      test(`${name}: symmetric key derived from an enrollment group`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const groupId = unique(`node-amqp-group-${lc}`);
        const twin = initialTwin(`group-${lc}`);
        const { responseBody: group } = await service.createOrUpdateEnrollmentGroup({
          enrollmentGroupId: groupId,
          attestation: { type: 'symmetricKey' },
          initialTwin: twin,
        });
        const registrationId = unique(`node-amqp-gdev-${lc}`);
        const key = deriveDeviceKey(group.attestation.symmetricKey.primaryKey, registrationId);
        const result = await registerWithKey(make(), registrationId, key);
        assertAssigned(result, registrationId);
        await assertHubTwin(registrationId, twin);
      });

      test(`${name}: X.509, individual enrollment`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const leaf = makeCert(unique(`node-amqp-x509-${lc}`));
        const twin = initialTwin(`x509-individual-${lc}`);
        await service.createOrUpdateIndividualEnrollment({
          registrationId: leaf.cn,
          attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: leaf.pem } } } },
          initialTwin: twin,
        });
        const result = await registerWithCert(make(), leaf.cn, leaf.pem, leaf.key);
        assertAssigned(result, leaf.cn);
        assert.equal(result.x509.certificateInfo.sha256Thumbprint, leaf.sha256, JSON.stringify(result));
        await assertHubTwin(leaf.cn, twin);
      });

      test(`${name}: X.509 group on the root, device sends leaf + intermediate`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const groupId = unique(`node-amqp-chain-${lc}`);
        const root = makeCert(`${groupId} Root CA`, { ca: true });
        const intermediate = makeCert(`${groupId} Intermediate CA`, { ca: true, issuer: root });
        const twin = initialTwin(`x509-group-${lc}`);
        await service.createOrUpdateEnrollmentGroup({
          enrollmentGroupId: groupId,
          attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: root.pem } } } },
          initialTwin: twin,
        });
        const leaf = makeCert(unique(`node-amqp-chdev-${lc}`), { issuer: intermediate });
        const result = await registerWithCert(make(), leaf.cn, leaf.pem + intermediate.pem, leaf.key);
        assertAssigned(result, leaf.cn);
        assert.equal(result.x509.enrollmentGroupId, groupId, JSON.stringify(result));
        assert.equal(result.x509.signingCertificateInfo.sha256Thumbprint, root.sha256, JSON.stringify(result));
        await assertHubTwin(leaf.cn, twin);
      });

      test(`${name}: refusals carry their DPS codes`, { timeout: TEST_TIMEOUT_MS }, async () => {
        // Wrong key: 401005, nothing registered.
        const registrationId = unique(`node-amqp-badkey-${lc}`);
        await service.createOrUpdateIndividualEnrollment({ registrationId, attestation: { type: 'symmetricKey' } });
        const wrongKey = crypto.randomBytes(32).toString('base64');
        let body = dpsErrorOf(await expectRejection(() => registerWithKey(make(), registrationId, wrongKey)));
        assert.equal(body.errorCode, 401005, JSON.stringify(body));
        const { responseBody: enrollment } = await service.getIndividualEnrollment(registrationId);
        assert.equal(enrollment.registrationState.status, 'unassigned', JSON.stringify(enrollment));

        // An ID scope this server does not have: 401004.
        const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
          registrationId: unique(`node-amqp-scope-${lc}`),
          attestation: { type: 'symmetricKey' },
        });
        body = dpsErrorOf(await expectRejection(() => registerWithKey(
          make(), created.registrationId, created.attestation.symmetricKey.primaryKey, '0ne00DEAD00')));
        assert.equal(body.errorCode, 401004, JSON.stringify(body));

        // A disabled enrollment: an ordinary answer with status `disabled`, which the SDK's
        // polling state machine turns into SyntaxError('status is disabled').
        const disabledId = unique(`node-amqp-disabled-${lc}`);
        const { responseBody: disabled } = await service.createOrUpdateIndividualEnrollment({
          registrationId: disabledId,
          attestation: { type: 'symmetricKey' },
          provisioningStatus: 'disabled',
        });
        const err = await expectRejection(() => registerWithKey(
          make(), disabledId, disabled.attestation.symmetricKey.primaryKey));
        assert.ok(err instanceof SyntaxError, `got ${err && err.stack}`);
        assert.equal(err.message, 'status is disabled');
        assert.equal(err.result.status, 'disabled', JSON.stringify(err.result));
        const hub = await registry.get(disabledId).then(() => 'exists', (e) => e.constructor.name);
        assert.equal(hub, 'DeviceNotFoundError');
      });
    });
  }
});
