// The built-in hub's device HTTPS API (issue 16 item 3) with Microsoft's Node SDKs:
//   azure-iot-device 1.18.4 + azure-iot-device-http 1.14.4 (`Client.fromConnectionString(cs, Http)`):
//     sendEvent and sendEventBatch (POST /devices/{id}/messages/events), cloud-to-device
//     receive by polling (GET /devices/{id}/messages/devicebound), complete, abandon and
//     reject (DELETE / POST .../devicebound/{lockToken}[/abandon]), a wrong key refused;
//     an X.509 (selfSigned) device with `x509=true` + setOptions({cert, key});
//   azure-iothub 1.16.6: Registry.create for the device identities.
// Telemetry is read and C2D messages are sent through Muster's hub REST extensions
// (GET /devices/{id}/telemetry, POST /devices/{id}/messages/cloudToDevice).
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/hub-http.test.js
//
// All tests share that one server; every test uses its own device ids.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const https = require('node:https');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { Registry } = require('azure-iothub');
const { makeCert, cleanup } = require('./certs');

const HUB_CONNECTION_STRING = process.env.MUSTER_HUB_CONNECTION_STRING;
if (!HUB_CONNECTION_STRING || !process.env.NODE_EXTRA_CA_CERTS) {
  throw new Error(
    'MUSTER_HUB_CONNECTION_STRING / NODE_EXTRA_CA_CERTS are not set: run these tests through ' +
    'tests/interop/muster_server.py (see tests/interop/README.md)'
  );
}
const HUB_API_VERSION = '2021-04-12';
const TEST_TIMEOUT_MS = 60000;
const WAIT_MS = 30000; // bound for every condition the tests wait for

function connectionStringParts(cs) {
  return Object.fromEntries(cs.split(';').map((p) => {
    const i = p.indexOf('=');
    return [p.slice(0, i), p.slice(i + 1)];
  }));
}
const HOST = connectionStringParts(HUB_CONNECTION_STRING).HostName;
const registry = Registry.fromConnectionString(HUB_CONNECTION_STRING);

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

// A SAS token for `resource` signed with `key` (base64), with `skn` when given.
function sasToken(resource, key, skn) {
  const se = Math.floor(Date.now() / 1000) + 600;
  const sr = encodeURIComponent(resource);
  const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64'))
    .update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}` + (skn ? `&skn=${skn}` : '');
}

function serviceToken() {
  const { SharedAccessKeyName, SharedAccessKey } = connectionStringParts(HUB_CONNECTION_STRING);
  return sasToken(HOST, SharedAccessKey, SharedAccessKeyName);
}

function hubRequest(method, path, body, headers) {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: HOST, port: 443, method, path, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({
        status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString('utf8'),
      }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function storedTelemetry(deviceId) {
  const r = await hubRequest('GET',
    `/devices/${encodeURIComponent(deviceId)}/telemetry?api-version=${HUB_API_VERSION}&after=0&limit=100`,
    undefined, { Authorization: serviceToken() });
  assert.equal(r.status, 200, r.text);
  return JSON.parse(r.text);
}

async function sendC2d(deviceId, body, headers) {
  const r = await hubRequest('POST',
    `/devices/${encodeURIComponent(deviceId)}/messages/cloudToDevice?api-version=${HUB_API_VERSION}`,
    body, { Authorization: serviceToken(), ...headers });
  assert.equal(r.status, 204, r.text);
}

// One raw device receive, as the SDK does it: 204 when nothing waits.
function deviceReceive(deviceId, key) {
  return hubRequest('GET',
    `/devices/${encodeURIComponent(deviceId)}/messages/devicebound?api-version=${HUB_API_VERSION}`,
    undefined, { Authorization: sasToken(`${HOST}/devices/${deviceId}`, key) });
}

// Resolves with the first value passed to `push` that `accept` takes, or rejects after WAIT_MS.
function waiter(what, accept = () => true) {
  let push;
  const promise = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${WAIT_MS} ms waiting for ${what}`)), WAIT_MS);
    push = (v) => { if (accept(v)) { clearTimeout(timer); resolve(v); } };
  });
  return { promise, push: (v) => push(v) };
}

async function httpDevice(prefix) {
  const deviceId = unique(prefix);
  const { responseBody: device } = await registry.create({ deviceId });
  const key = device.authentication.symmetricKey.primaryKey;
  const client = DeviceClient.fromConnectionString(
    `HostName=${HOST};DeviceId=${deviceId};SharedAccessKey=${key}`, Http);
  openClients.push(client);
  return { deviceId, key, client };
}

const openClients = [];
after(async () => {
  for (const c of openClients) {
    await c.close().catch(() => {});
  }
  cleanup();
});

test('Http: sendEvent and sendEventBatch reach the hub telemetry', { timeout: TEST_TIMEOUT_MS }, async () => {
  const { deviceId, client } = await httpDevice('node-http-d2c');
  await client.open();

  const msg = new Message(JSON.stringify({ windSpeed: 12.5 }));
  msg.messageId = 'http-1';
  msg.correlationId = 'corr-1';
  msg.contentType = 'application/json';
  msg.contentEncoding = 'utf-8';
  msg.properties.add('temperatureAlert', 'true');
  // sendEvent resolves on the hub's 204: the message is stored by then.
  await client.sendEvent(msg);
  let stored = await storedTelemetry(deviceId);
  assert.equal(stored.length, 1);
  assert.equal(stored[0].deviceId, deviceId);
  assert.equal(stored[0].body, JSON.stringify({ windSpeed: 12.5 }));
  assert.equal(stored[0].properties.temperaturealert, 'true');
  assert.equal(stored[0].systemProperties.messageId, 'http-1');
  assert.equal(stored[0].systemProperties.correlationId, 'corr-1');
  assert.equal(stored[0].systemProperties.contentType, 'application/json');
  assert.equal(stored[0].systemProperties.contentEncoding, 'utf-8');
  assert.equal(stored[0].systemProperties.to, `/devices/${deviceId}/messages/events`);

  const batch = ['b-1', 'b-2', 'b-3'].map((text, i) => {
    const m = new Message(text);
    m.properties.add('index', String(i));
    return m;
  });
  await client.sendEventBatch(batch);
  stored = await storedTelemetry(deviceId);
  assert.deepEqual(stored.map((m) => m.body), [JSON.stringify({ windSpeed: 12.5 }), 'b-1', 'b-2', 'b-3']);
  assert.deepEqual(stored.slice(1).map((m) => m.properties.index), ['0', '1', '2']);
  assert.deepEqual(stored.map((m) => m.sequenceNumber), [1, 2, 3, 4]);
  await client.close();
});

test('Http: a C2D message is received, abandoned, received again and completed; another rejected', { timeout: TEST_TIMEOUT_MS }, async () => {
  const { deviceId, key, client } = await httpDevice('node-http-c2d');
  const received = [];
  let next = null;
  client.on('message', (msg) => {
    received.push(msg);
    if (next) next.push(msg);
  });
  client.on('error', (e) => received.push(e));
  await client.open(); // starts polling every second (drain: true)

  next = waiter('the first cloud-to-device message');
  await sendC2d(deviceId, 'blink', {
    'iothub-messageid': 'c2d-1', 'iothub-correlationid': 'corr-c2d', 'iothub-app-priority': 'high',
  });
  const first = await next.promise;
  assert.equal(first.data.toString(), 'blink');
  assert.equal(first.messageId, 'c2d-1');
  assert.equal(first.correlationId, 'corr-c2d');
  // The Node HTTP transport keeps the header name as the property key.
  assert.equal(first.properties.getValue('iothub-app-priority'), 'high');
  assert.match(first.lockToken, /^[0-9a-f-]{36}$/);

  // Abandon: the hub hands it out again under a new lock.
  next = waiter('the abandoned message again');
  await client.abandon(first);
  const again = await next.promise;
  assert.equal(again.messageId, 'c2d-1');
  assert.notEqual(again.lockToken, first.lockToken);
  await client.complete(again);

  next = waiter('the second cloud-to-device message');
  await sendC2d(deviceId, 'unwanted', { 'iothub-messageid': 'c2d-2' });
  const second = await next.promise;
  assert.equal(second.messageId, 'c2d-2');
  await client.reject(second);

  // Completed and rejected: nothing waits any more, and the old locks are gone.
  const r = await deviceReceive(deviceId, key);
  assert.equal(r.status, 204, r.text);
  let err;
  try {
    await client.complete(first);
  } catch (e) {
    err = e;
  }
  assert.ok(err, 'completing an abandoned lock must fail');
  assert.equal(err.response.statusCode, 412);
  assert.equal(err.response.headers['iothub-errorcode'], 'DeviceMessageLockLost');
  await client.close();
  assert.deepEqual(received.map((m) => m.messageId), ['c2d-1', 'c2d-1', 'c2d-2']);
});

test('Http: a wrong device key is refused with UnauthorizedError and nothing is stored', { timeout: TEST_TIMEOUT_MS }, async () => {
  const deviceId = unique('node-http-badkey');
  await registry.create({ deviceId });
  const client = DeviceClient.fromConnectionString(
    `HostName=${HOST};DeviceId=${deviceId};SharedAccessKey=${crypto.randomBytes(32).toString('base64')}`, Http);
  openClients.push(client);
  await client.open();
  await assert.rejects(client.sendEvent(new Message('x')), (e) => e.constructor.name === 'UnauthorizedError');
  assert.deepEqual(await storedTelemetry(deviceId), []);
  await client.close();
});

test('Http: an X.509 device sends and receives with its client certificate', { timeout: TEST_TIMEOUT_MS }, async () => {
  const deviceId = unique('node-http-x509');
  const leaf = makeCert(deviceId);
  await registry.create({
    deviceId,
    authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: leaf.sha256 } },
  });
  const client = DeviceClient.fromConnectionString(`HostName=${HOST};DeviceId=${deviceId};x509=true`, Http);
  openClients.push(client);
  // The Http transport's setOptions calls back only when the options also set the receive
  // policy (interval, at, cron, manualPolling or drain), so the default polling goes along.
  await client.setOptions({ cert: leaf.pem, key: leaf.key, interval: 1, drain: true });
  const next = waiter('the cloud-to-device message');
  client.on('message', (msg) => next.push(msg));
  await client.open();
  await client.sendEvent(new Message('x509 over https'));
  const stored = await storedTelemetry(deviceId);
  assert.deepEqual(stored.map((m) => m.body), ['x509 over https']);

  await sendC2d(deviceId, 'to the x509 device', { 'iothub-messageid': 'c2d-x509' });
  const msg = await next.promise;
  assert.equal(msg.data.toString(), 'to the x509 device');
  await client.complete(msg);
  await client.close();

  // Another certificate for the same device id is refused.
  const other = makeCert(deviceId);
  const impostor = DeviceClient.fromConnectionString(`HostName=${HOST};DeviceId=${deviceId};x509=true`, Http);
  openClients.push(impostor);
  await impostor.setOptions({ cert: other.pem, key: other.key, interval: 1, drain: true });
  await impostor.open();
  await assert.rejects(impostor.sendEvent(new Message('x')), (e) => e.constructor.name === 'UnauthorizedError');
  assert.equal((await storedTelemetry(deviceId)).length, 1);
  await impostor.close();
});
