// The DPS symmetric-key group tutorial end to end with Microsoft's Node SDKs against Muster's
// built-in hub:
//   azure-iot-provisioning-device 1.9.1 + azure-iot-provisioning-device-mqtt 1.8.1 (Mqtt, MqttWs)
//     + azure-iot-security-symmetric-key 1.8.2: register with a key derived from the group key;
//   azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4 (Mqtt on 8883, MqttWs on
//     wss://host:443/$iothub/websocket): connect to the assigned hub, 10 messages, a direct
//     method handler, twin (desired from the enrollment's initial twin, reported patch, desired
//     notification), a cloud-to-device message;
//   azure-iothub 1.16.6: Client.invokeDeviceMethod (REST: POST /twins/{id}/methods over HTTPS
//     to port 443 of the connection string's HostName) and Registry.getTwin / updateTwin;
//   azure-iot-provisioning-service 1.11.2: the enrollment group.
// Telemetry is read and the C2D message is sent through Muster's hub REST extensions
// (GET /devices/{id}/telemetry, POST /devices/{id}/messages/cloudToDevice).
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/tutorial.test.js
//
// All tests share that one server; every test uses its own registration id.
'use strict';

const { test, describe, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const ProvMqtt = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const HubMqtt = require('azure-iot-device-mqtt');
const { Client: ServiceClient, Registry } = require('azure-iothub');

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
const TUTORIAL_REGISTRATION_ID = 'sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6';
const TEST_TIMEOUT_MS = 90000;
const WAIT_MS = 30000; // bound for every callback the tests wait for

const service = ProvisioningServiceClient.fromConnectionString(CONNECTION_STRING);
// Constructed with its default AMQP transport, which is never opened: invokeDeviceMethod
// uses the client's REST API client (HTTPS, port 443).
const serviceClient = ServiceClient.fromConnectionString(HUB_CONNECTION_STRING);
const registry = Registry.fromConnectionString(HUB_CONNECTION_STRING);

// The provisioning transport and the hub transport of one run: both plain MQTT, or both
// MQTT over WebSocket. The tutorial id is used as is once; the other run appends a suffix
// (all tests share one server).
const TRANSPORTS = [
  { name: 'Mqtt', prov: () => new ProvMqtt.Mqtt(), hub: HubMqtt.Mqtt, registrationId: TUTORIAL_REGISTRATION_ID },
  { name: 'MqttWs', prov: () => new ProvMqtt.MqttWs(), hub: HubMqtt.MqttWs, registrationId: `${TUTORIAL_REGISTRATION_ID}-ws` },
];

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

function deriveDeviceKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64'))
    .update(registrationId, 'utf8')
    .digest('base64');
}

function connectionStringParts(cs) {
  return Object.fromEntries(cs.split(';').map((p) => {
    const i = p.indexOf('=');
    return [p.slice(0, i), p.slice(i + 1)];
  }));
}

// A hub service SAS token (sr = URL-encoded host, skn = policy), computed here.
function hubSasToken() {
  const { HostName, SharedAccessKeyName, SharedAccessKey } = connectionStringParts(HUB_CONNECTION_STRING);
  const se = Math.floor(Date.now() / 1000) + 600;
  const sr = encodeURIComponent(HostName);
  const sig = crypto.createHmac('sha256', Buffer.from(SharedAccessKey, 'base64'))
    .update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=${SharedAccessKeyName}`;
}

function hubRequest(method, path, body, headers = {}) {
  const host = connectionStringParts(HUB_CONNECTION_STRING).HostName;
  return new Promise((resolve, reject) => {
    const req = https.request({
      host, port: 443, method, path,
      headers: { Authorization: hubSasToken(), ...headers },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, text: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function storedTelemetry(deviceId) {
  const r = await hubRequest('GET',
    `/devices/${encodeURIComponent(deviceId)}/telemetry?api-version=${HUB_API_VERSION}&after=0&limit=100`);
  assert.equal(r.status, 200, r.text);
  return JSON.parse(r.text);
}

// Resolves with the first value passed to the returned `push`, or rejects after `ms`.
function waiter(what, ms = WAIT_MS) {
  let push;
  const promise = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    push = (v) => { clearTimeout(timer); resolve(v); };
  });
  return { promise, push };
}

// Tutorial steps 1-3: a symmetric-key group with an initial twin, the key derived here, the
// device registered with the provisioning device client.
async function provision(transport, registrationId) {
  const groupId = unique(`node-tutorial-${transport.name.toLowerCase()}`);
  const initialTwin = {
    tags: { tutorial: 'symmetric-key-group' },
    properties: { desired: { telemetryInterval: 5, thresholds: { temperature: 30.5 } } },
  };
  const { responseBody: group } = await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: groupId,
    attestation: { type: 'symmetricKey' },
    initialTwin,
  });
  const deviceKey = deriveDeviceKey(group.attestation.symmetricKey.primaryKey, registrationId);
  const security = new SymmetricKeySecurityClient(registrationId, deviceKey);
  const client = ProvisioningDeviceClient.create(DPS_HOST, ID_SCOPE, transport.prov(), security);
  const result = await client.register();
  assert.equal(result.status, 'assigned', JSON.stringify(result));
  assert.equal(result.assignedHub, EXPECTED_HUB, JSON.stringify(result));
  assert.equal(result.deviceId, registrationId, JSON.stringify(result));
  return { result, deviceKey, initialTwin };
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

describe('symmetric-key group tutorial (provision, connect, telemetry, method, twin, C2D)', () => {
  for (const transport of TRANSPORTS) {
    test(`${transport.name}: tutorial end to end`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
      const { result, deviceKey, initialTwin } = await provision(transport, transport.registrationId);
      const deviceId = result.deviceId;

      // Connect to the assigned hub with the same key, as the tutorial's device app does.
      const client = DeviceClient.fromConnectionString(
        `HostName=${result.assignedHub};DeviceId=${deviceId};SharedAccessKey=${deviceKey}`,
        transport.hub
      );
      openClients.push(client);
      const errors = [];
      client.on('error', (e) => errors.push(e));
      await client.open();

      // "Sending message #1 ... #10": sendEvent resolves after the hub's PUBACK.
      const run = crypto.randomBytes(4).toString('hex');
      const sent = [];
      for (let i = 1; i <= 10; i++) {
        const msg = new Message(`test wind speed ${i}`);
        msg.messageId = `msg-${run}-${i}`;
        msg.properties.add('index', String(i));
        msg.properties.add('source', 'tutorial');
        await client.sendEvent(msg);
        sent.push({ body: `test wind speed ${i}`, messageId: msg.messageId, properties: { index: String(i), source: 'tutorial' } });
      }
      const stored = await storedTelemetry(deviceId);
      assert.equal(stored.length, 10, JSON.stringify(stored));
      const first = stored[0].sequenceNumber;
      stored.forEach((m, i) => {
        assert.equal(m.sequenceNumber, first + i, JSON.stringify(m));
        assert.equal(m.deviceId, deviceId);
        assert.equal(m.bodyEncoding, 'utf-8', JSON.stringify(m));
        assert.equal(m.body, sent[i].body, JSON.stringify(m));
        assert.equal(m.systemProperties.messageId, sent[i].messageId, JSON.stringify(m));
        assert.deepEqual(m.properties, sent[i].properties, JSON.stringify(m));
      });

      // A direct method invoked with azure-iothub, answered by the device.
      const seen = waiter('the direct method request on the device');
      client.onDeviceMethod('reboot', (request, response) => {
        seen.push(request);
        response.send(201, { rebooted: true, echo: request.payload, method: request.methodName })
          .catch((e) => errors.push(e));
      });
      const payload = { delay: 3, reason: 'tutorial', list: [1, 'a', null] };
      // connectTimeoutInSeconds: the hub waits (bounded) until the device's method
      // subscription, which onDeviceMethod sends without telling when it is done.
      const { result: methodResult } = await serviceClient.invokeDeviceMethod(deviceId, {
        methodName: 'reboot', payload, responseTimeoutInSeconds: 20, connectTimeoutInSeconds: 10,
      });
      const request = await seen.promise;
      assert.equal(request.methodName, 'reboot');
      assert.deepEqual(request.payload, payload);
      assert.equal(methodResult.status, 201, JSON.stringify(methodResult));
      assert.deepEqual(methodResult.payload, { rebooted: true, echo: payload, method: 'reboot' });

      // Twin: desired from the enrollment's initial twin; reported seen by the service.
      const twin = await client.getTwin();
      assert.deepEqual(userProps(twin.properties.desired), initialTwin.properties.desired);
      const reported = { firmware: '1.0.4', telemetryInterval: 5, location: { lat: 47.6, lon: -122.3 } };
      await new Promise((resolve, reject) => twin.properties.reported.update(reported, (e) => (e ? reject(e) : resolve())));
      const { responseBody: serviceTwin } = await registry.getTwin(deviceId);
      assert.deepEqual(userProps(serviceTwin.properties.reported), reported);

      // A desired patch from the service reaches twin.on('properties.desired').
      const desired = waiter('the desired-property patch on the device');
      twin.on('properties.desired', (delta) => {
        if (delta.mode === 'storm') desired.push(delta);
      });
      // on() subscribes to $iothub/twin/PATCH/properties/desired/# without telling when it
      // is done (and the hub sends desired patches only to subscribed sessions): subscribing
      // again through the twin's public method calls back after that SUBACK.
      await new Promise((resolve, reject) => twin.enableTwinDesiredPropertiesUpdates((e) => (e ? reject(e) : resolve())));
      await registry.updateTwin(deviceId, { properties: { desired: { telemetryInterval: 10, mode: 'storm' } } }, '*');
      const delta = await desired.promise;
      assert.equal(delta.telemetryInterval, 10, JSON.stringify(delta));
      assert.equal(twin.properties.desired.mode, 'storm');

      // A cloud-to-device message (REST extension) reaches client.on('message').
      const c2d = waiter('the cloud-to-device message');
      client.on('message', (msg) => {
        c2d.push(msg);
        client.complete(msg).catch((e) => errors.push(e));
      });
      const body = JSON.stringify({ command: 'blink', times: 3 });
      const r = await hubRequest('POST',
        `/devices/${encodeURIComponent(deviceId)}/messages/cloudToDevice?api-version=${HUB_API_VERSION}`,
        body, { 'iothub-messageid': `c2d-${run}`, 'iothub-app-priority': 'high', 'content-type': 'application/json' });
      assert.equal(r.status, 204, r.text);
      const msg = await c2d.promise;
      assert.equal(msg.data.toString(), body);
      assert.equal(msg.messageId, `c2d-${run}`);
      assert.equal(msg.properties.getValue('priority'), 'high');

      assert.equal((await storedTelemetry(deviceId)).length, 10, 'nothing else was stored');
      assert.deepEqual(errors, []);
      await client.close();
      t.diagnostic(`${transport.name}: ${deviceId} provisioned, 10 messages stored (seq ${first}..${first + 9}), method 201, twin, C2D`);
    });

    test(`${transport.name}: a wrong device key is refused`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const registrationId = unique(`node-badkey-${transport.name.toLowerCase()}`);
      const { result } = await provision(transport, registrationId);
      const wrongKey = crypto.randomBytes(32).toString('base64');
      const client = DeviceClient.fromConnectionString(
        `HostName=${result.assignedHub};DeviceId=${result.deviceId};SharedAccessKey=${wrongKey}`,
        transport.hub
      );
      openClients.push(client);
      client.on('error', () => {});
      await assert.rejects(client.open(), (err) => {
        // CONNACK "Not authorized" → azure-iot-mqtt-base translateError → UnauthorizedError.
        assert.equal(err.constructor.name, 'UnauthorizedError', err && err.stack);
        return true;
      });
      assert.deepEqual(await storedTelemetry(result.deviceId), []);
    });
  }
});
