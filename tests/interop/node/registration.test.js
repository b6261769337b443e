// Issue 11 items 2-4 with Microsoft's Node SDKs against Muster:
//   item 2: a registration record remains while the hub device and the enrollment group are
//     deleted and the group comes back with another initial twin; registering again creates
//     the device with the current group's initial twin (substatus deviceDataReset):
//     azure-iot-provisioning-device 1.9.1 (+ -http 1.9.1, -mqtt 1.8.1) registers,
//     azure-iothub 1.16.6 Registry.delete / getTwin on the built-in hub,
//     azure-iot-provisioning-service 1.11.2 deletes and recreates the group;
//   item 3: the query specification of the SDK's own samples, {"query": "*"}, on the three
//     query operations (createIndividualEnrollmentQuery, createEnrollmentGroupQuery,
//     createEnrollmentGroupDeviceRegistrationStateQuery); a WHERE clause is a 400;
//   item 4: registration ids that differ only in case: the record, the answer's deviceId and
//     the hub identity take the latest spelling (Registry.list / get), the device that
//     registered last connects (azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4), the
//     other is refused.
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/registration.test.js
//
// All tests share that one server; every test uses its own ids.
'use strict';

const { test, describe, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { Mqtt } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Client: DeviceClient } = require('azure-iot-device');
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
const TEST_TIMEOUT_MS = 60000;

const service = ProvisioningServiceClient.fromConnectionString(CONNECTION_STRING);
const registry = Registry.fromConnectionString(HUB_CONNECTION_STRING);

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

function deriveDeviceKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64'))
    .update(registrationId, 'utf8')
    .digest('base64');
}

async function createGroup(groupId, initialTwin) {
  const { responseBody: group } = await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: groupId,
    attestation: { type: 'symmetricKey' },
    initialTwin,
  });
  return group.attestation.symmetricKey.primaryKey;
}

async function register(transport, registrationId, deviceKey) {
  const security = new SymmetricKeySecurityClient(registrationId, deviceKey);
  const client = ProvisioningDeviceClient.create(DPS_HOST, ID_SCOPE, transport, security);
  const result = await client.register();
  assert.equal(result.status, 'assigned', JSON.stringify(result));
  assert.equal(result.assignedHub, EXPECTED_HUB, JSON.stringify(result));
  return result;
}

function userProps(obj) {
  return Object.fromEntries(Object.entries(obj || {}).filter(([k]) => !k.startsWith('$')));
}

const openClients = [];
after(async () => {
  for (const c of openClients) {
    await c.close().catch(() => {});
  }
});

describe('item 2: a device absent from its hub gets the current enrollment\'s initial twin', () => {
  for (const [name, make] of [['Http', () => new Http()], ['Mqtt', () => new Mqtt()]]) {
    test(`${name}: recreated group, deleted hub device, register again`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const groupId = unique('node-recreated');
      const registrationId = unique('node-phoenix');
      const firstTwin = { tags: { generation: 'first' }, properties: { desired: { interval: 10 } } };
      const secondTwin = { tags: { generation: 'second', site: 'lyon' }, properties: { desired: { interval: 60 } } };

      let key = deriveDeviceKey(await createGroup(groupId, firstTwin), registrationId);
      const first = await register(make(), registrationId, key);
      assert.equal(first.substatus, 'initialAssignment', JSON.stringify(first));

      // The operator deletes the hub device and the group; the registration record stays.
      await registry.delete(registrationId);
      await service.deleteEnrollmentGroup(groupId);
      const { responseBody: record } = await service.getDeviceRegistrationState(registrationId);
      assert.equal(record.status, 'assigned', JSON.stringify(record));
      // The group comes back (new generated keys) with another initial twin.
      key = deriveDeviceKey(await createGroup(groupId, secondTwin), registrationId);

      const again = await register(make(), registrationId, key);
      assert.equal(again.deviceId, registrationId, JSON.stringify(again));
      assert.equal(again.createdDateTimeUtc, first.createdDateTimeUtc, 'the same record');

      const { responseBody: twin } = await registry.getTwin(registrationId);
      assert.deepEqual(twin.tags, secondTwin.tags, JSON.stringify(twin));
      assert.deepEqual(userProps(twin.properties.desired), secondTwin.properties.desired, JSON.stringify(twin));
      assert.equal(again.substatus, 'deviceDataReset', JSON.stringify(again));
      const { responseBody: device } = await registry.get(registrationId);
      assert.equal(device.authentication.symmetricKey.primaryKey, key, 'the hub has the new derived key');
    });
  }
});

describe('item 3: the query specification of the SDK samples', () => {
  test('{"query": "*"} lists enrollments, groups and a group\'s registrations; WHERE is refused', { timeout: TEST_TIMEOUT_MS }, async () => {
    const groupId = unique('node-query-group');
    const registrationId = unique('node-query-enr');
    await service.createOrUpdateIndividualEnrollment({ registrationId, attestation: { type: 'symmetricKey' } });
    const groupKey = await createGroup(groupId, { tags: {}, properties: { desired: {} } });
    const deviceId = unique('node-query-dev');
    await register(new Http(), deviceId, deriveDeviceKey(groupKey, deviceId));

    // Exactly as provisioning/service/samples/query.js builds them.
    const enrollments = service.createIndividualEnrollmentQuery({ query: '*' }, 10);
    const all = [];
    for (let i = 0; enrollments.hasMoreResults; i++) {
      assert.ok(i < 1000, 'query did not terminate');
      // The token explicitly: Query.next() with no argument (the promise form) sends none and
      // starts again from the first page, so this loop only ended while one page held all.
      const { responseBody: page } = await enrollments.next(enrollments.continuationToken);
      all.push(...page.map((e) => e.registrationId));
    }
    assert.ok(all.includes(registrationId), JSON.stringify(all));

    const { responseBody: groups, httpResponse } = await service.createEnrollmentGroupQuery({ query: '*' }, 100).next();
    assert.equal(httpResponse.headers['x-ms-item-type'], 'EnrollmentGroup');
    assert.ok(groups.some((g) => g.enrollmentGroupId === groupId), JSON.stringify(groups));

    const { responseBody: states } = await service
      .createEnrollmentGroupDeviceRegistrationStateQuery({ query: '*' }, groupId, 10).next();
    assert.deepEqual(states.map((s) => s.registrationId), [deviceId]);

    let err;
    try {
      await service.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments WHERE x = 1' }).next();
    } catch (e) {
      err = e;
    }
    assert.ok(err && err.response, `expected an HTTP error, got ${err && err.stack}`);
    assert.equal(err.response.statusCode, 400);
    const body = JSON.parse(err.responseBody);
    assert.equal(body.errorCode, 400010, err.responseBody);
    assert.match(body.message, /'\*'/, err.responseBody);
  });
});

describe('item 4: registration ids that differ only in case', () => {
  test('the last spelling is the record\'s, the answer\'s and the hub\'s; only that device connects', { timeout: TEST_TIMEOUT_MS }, async () => {
    const groupId = unique('node-cased');
    const groupKey = await createGroup(groupId, { tags: { line: '7' }, properties: { desired: {} } });
    const firstId = unique('Node-Cased-Device');
    const lastId = firstId.toLowerCase();
    const keys = { [firstId]: deriveDeviceKey(groupKey, firstId), [lastId]: deriveDeviceKey(groupKey, lastId) };

    await register(new Mqtt(), firstId, keys[firstId]);
    const last = await register(new Mqtt(), lastId, keys[lastId]);
    assert.equal(last.deviceId, lastId, JSON.stringify(last));
    assert.equal(last.registrationId, lastId, JSON.stringify(last));

    const { responseBody: record } = await service.getDeviceRegistrationState(firstId.toUpperCase());
    assert.deepEqual([record.registrationId, record.deviceId], [lastId, lastId], JSON.stringify(record));
    const { responseBody: devices } = await registry.list();
    const ids = devices.map((d) => d.deviceId).filter((id) => id.toLowerCase() === lastId);
    assert.deepEqual(ids, [lastId], 'one hub identity, the latest spelling');
    const { responseBody: device } = await registry.get(lastId);
    assert.equal(device.deviceId, lastId);
    assert.equal(device.authentication.symmetricKey.primaryKey, keys[lastId]);

    const hubClient = (id) => {
      const c = DeviceClient.fromConnectionString(
        `HostName=${last.assignedHub};DeviceId=${id};SharedAccessKey=${keys[id]}`, HubMqtt.Mqtt);
      openClients.push(c);
      c.on('error', () => {});
      return c;
    };
    const winner = hubClient(lastId);
    await winner.open();
    await winner.close();
    await assert.rejects(hubClient(firstId).open(), (e) => {
      assert.equal(e.constructor.name, 'UnauthorizedError', e && e.stack);
      return true;
    });
  });
});
