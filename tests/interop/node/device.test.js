// Device registration with Microsoft's Node device SDK against Muster:
//   azure-iot-provisioning-device 1.9.1 (ProvisioningDeviceClient),
//   azure-iot-provisioning-device-http 1.9.1 (Http),
//   azure-iot-provisioning-device-mqtt 1.8.1 (Mqtt on 8883, MqttWs on wss://host:443/$iothub/websocket),
//   azure-iot-security-symmetric-key 1.8.2 (SymmetricKeySecurityClient).
// Enrollments are created with azure-iot-provisioning-service 1.11.2.
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/device.test.js
//
// All tests in this file share that one server; every test uses its own ids.
'use strict';

const { test, describe } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

const CONNECTION_STRING = process.env.MUSTER_CONNECTION_STRING;
const CONNECTION_JSON = process.env.MUSTER_CONNECTION_JSON;
if (!CONNECTION_STRING || !CONNECTION_JSON || !process.env.NODE_EXTRA_CA_CERTS) {
  throw new Error(
    'MUSTER_CONNECTION_STRING / MUSTER_CONNECTION_JSON / NODE_EXTRA_CA_CERTS are not set: run ' +
    'these tests through tests/interop/muster_server.py (see tests/interop/README.md)'
  );
}
const INFO = JSON.parse(fs.readFileSync(CONNECTION_JSON, 'utf8'));
const DPS_HOST = INFO.dpsHost;
const ID_SCOPE = INFO.idScope;
const EXPECTED_HUB = process.env.MUSTER_DPS_HOST || '127.0.0.2';

const service = ProvisioningServiceClient.fromConnectionString(CONNECTION_STRING);

const TRANSPORTS = [
  { name: 'Http', make: () => new Http() },
  { name: 'Mqtt', make: () => new Mqtt() },
  { name: 'MqttWs', make: () => new MqttWs() },
];

const TEST_TIMEOUT_MS = 60000;

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

// DPS group key derivation, computed here (not by the server):
// base64(HMAC-SHA256(key = b64decode(groupKey), msg = UTF-8(registrationId))).
function deriveDeviceKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64'))
    .update(registrationId, 'utf8')
    .digest('base64');
}

function randomKey() {
  return crypto.randomBytes(64).toString('base64');
}

// register() through the SDK exactly as a device application does; returns the
// registrationState and the time from the call to the result.
async function register(transport, registrationId, key, payload) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const client = ProvisioningDeviceClient.create(DPS_HOST, ID_SCOPE, transport, security);
  if (payload !== undefined) {
    client.setProvisioningPayload(payload);
  }
  const t0 = process.hrtime.bigint();
  // register() disconnects its transport itself, on success and on failure.
  const result = await client.register();
  return { result, ms: Number(process.hrtime.bigint() - t0) / 1e6 };
}

function assertAssigned(result, registrationId, deviceId) {
  assert.ok(result, 'register() resolved without a result');
  assert.equal(result.status, 'assigned', JSON.stringify(result));
  assert.equal(result.assignedHub, EXPECTED_HUB, JSON.stringify(result));
  assert.equal(result.deviceId, deviceId, JSON.stringify(result));
  assert.equal(result.registrationId, registrationId, JSON.stringify(result));
  assert.equal(result.substatus, 'initialAssignment', JSON.stringify(result));
}

async function assertServiceRecord(registrationId, deviceId) {
  const { responseBody: state } = await service.getDeviceRegistrationState(registrationId);
  assert.equal(state.status, 'assigned', JSON.stringify(state));
  assert.equal(state.assignedHub, EXPECTED_HUB, JSON.stringify(state));
  assert.equal(state.deviceId, deviceId, JSON.stringify(state));
}

// Records what the transport hands the SDK for each register request (test-only
// instrumentation; the SDK's behaviour is unchanged). Http: (err, result, response);
// Mqtt: (err, result, pollingInterval).
function spyOnRegistrationResponses(transport) {
  const seen = [];
  const original = transport.registrationRequest.bind(transport);
  transport.registrationRequest = (request, callback) => original(request, (err, result, response, ...rest) => {
    seen.push({ err, result, response });
    callback(err, result, response, ...rest);
  });
  return seen;
}

async function expectRejection(fn) {
  try {
    const r = await fn();
    assert.fail(`expected register() to fail, got ${JSON.stringify(r)}`);
  } catch (e) {
    if (e instanceof assert.AssertionError) throw e;
    return e;
  }
}

describe('device registration (symmetric key)', () => {
  test('connection.json names the built-in hub', () => {
    assert.ok(Array.isArray(INFO.hubs) && INFO.hubs.length > 0, `no hubs: ${JSON.stringify(INFO)}`);
    assert.equal(INFO.hubs[0].hostName, EXPECTED_HUB);
    assert.equal(INFO.hubs[0].builtIn, true);
  });

  for (const { name, make } of TRANSPORTS) {
    describe(name, () => {
      test(`${name}: individual enrollment`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
        const registrationId = unique(`node-ind-${name.toLowerCase()}`);
        const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
          registrationId,
          attestation: { type: 'symmetricKey' },
          initialTwin: { tags: { transport: name }, properties: { desired: { interval: 5 } } },
        });
        const key = created.attestation.symmetricKey.primaryKey;

        const transport = make();
        const responses = spyOnRegistrationResponses(transport);
        const { result, ms } = await register(transport, registrationId, key);
        t.diagnostic(`${name} individual: register() took ${ms.toFixed(0)} ms`);
        assertAssigned(result, registrationId, registrationId);
        await assertServiceRecord(registrationId, registrationId);
        assert.equal(responses.length, 1, 'expected exactly one register request (answered assigned)');
        if (name === 'Http') {
          // device-protocol.md §2.3/§2.4: PUT register answers 202 (C# and IIS accept only
          // 202), JSON content type (Node parses nothing otherwise).
          const { response } = responses[0];
          assert.equal(response.statusCode, 202);
          assert.match(response.headers['content-type'], /^application\/json/);
        }
      });

      test(`${name}: registration id with '.' and ':' (group, derived key)`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const groupId = unique(`node-grp-chars-${name.toLowerCase()}`);
        const { responseBody: group } = await service.createOrUpdateEnrollmentGroup({
          enrollmentGroupId: groupId,
          attestation: { type: 'symmetricKey' },
        });
        // Node signs sr raw (not URL-encoded) and puts the raw id in the HTTP path and
        // the MQTT username.
        const registrationId = `node.dev:${crypto.randomBytes(4).toString('hex')}:${name.toLowerCase()}`;
        const deviceKey = deriveDeviceKey(group.attestation.symmetricKey.primaryKey, registrationId);
        const { result } = await register(make(), registrationId, deviceKey);
        assertAssigned(result, registrationId, registrationId);
      });

      test(`${name}: enrollment group, derived key, custom payload`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
        const groupId = unique(`node-grp-${name.toLowerCase()}`);
        const { responseBody: group } = await service.createOrUpdateEnrollmentGroup({
          enrollmentGroupId: groupId,
          attestation: { type: 'symmetricKey' },
          initialTwin: { tags: { group: groupId }, properties: { desired: { interval: 7 } } },
        });
        const registrationId = unique(`node-grp-dev-${name.toLowerCase()}`);
        const deviceKey = deriveDeviceKey(group.attestation.symmetricKey.primaryKey, registrationId);
        const payload = { modelId: 'dtmi:muster:interop;1', nested: { n: 1, list: [1, 'a', null] } };

        const { result, ms } = await register(make(), registrationId, deviceKey, payload);
        t.diagnostic(`${name} group+payload: register() took ${ms.toFixed(0)} ms`);
        assertAssigned(result, registrationId, registrationId);
        // No custom allocation webhook: DPS returns no payload to the device.
        assert.equal(result.payload, undefined, JSON.stringify(result));
        await assertServiceRecord(registrationId, registrationId);
      });

      test(`${name}: wrong key is rejected with UnauthorizedError`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const registrationId = unique(`node-badkey-${name.toLowerCase()}`);
        await service.createOrUpdateIndividualEnrollment({
          registrationId,
          attestation: { type: 'symmetricKey' },
        });
        const err = await expectRejection(() => register(make(), registrationId, randomKey()));
        // Http: azure-iot-http-base turns the 401 into UnauthorizedError (err.response,
        // err.responseBody); Mqtt/MqttWs: translateError(401) on the res/401 response
        // (err.result = the parsed error body).
        assert.equal(err.constructor.name, 'UnauthorizedError', `got ${err && err.stack}`);
        let body;
        if (name === 'Http') {
          assert.equal(err.response && err.response.statusCode, 401);
          body = JSON.parse(err.responseBody);
        } else {
          body = err.result;
          assert.match(err.transportObject.topic, /^\$dps\/registrations\/res\/401\/\?\$rid=/);
        }
        assert.ok(Number.isInteger(body.errorCode) && body.errorCode >= 401000 && body.errorCode < 402000,
          `error body ${JSON.stringify(body)}`);

        const { responseBody: enrollment } = await service.getIndividualEnrollment(registrationId);
        assert.equal(enrollment.registrationState.status, 'unassigned', JSON.stringify(enrollment));
      });

      test(`${name}: disabled enrollment fails with SyntaxError('status is disabled')`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const registrationId = unique(`node-disabled-${name.toLowerCase()}`);
        const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
          registrationId,
          attestation: { type: 'symmetricKey' },
          provisioningStatus: 'disabled',
        });
        const key = created.attestation.symmetricKey.primaryKey;
        const err = await expectRejection(() => register(make(), registrationId, key));
        // The polling state machine knows assigning/assigned/failed/registering; any other
        // status fails with SyntaxError('status is <status>'), err.result = the body.
        assert.ok(err instanceof SyntaxError, `got ${err && err.stack}`);
        assert.equal(err.message, 'status is disabled');
        assert.equal(err.result.status, 'disabled', JSON.stringify(err.result));
        const { responseBody: state } = await service.getDeviceRegistrationState(registrationId);
        assert.equal(state.status, 'disabled', JSON.stringify(state));
      });
    });
  }
});
