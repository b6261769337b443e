// The built-in hub's device endpoint over AMQP with Microsoft's Node SDK (issue 16 item 2):
//   azure-iot-device 1.18.4 + azure-iot-device-amqp 1.14.4 (Amqp on 5671, AmqpWs on
//     wss://host:443/$iothub/websocket with the AMQPWSB10 subprotocol), on
//     azure-iot-amqp-base (rhea). SAS devices authenticate with a CBS put-token on `$cbs`;
//     the X.509 device presents its certificate in TLS (no SASL).
//   azure-iothub 1.16.6: Registry (devices, twins), Client.invokeDeviceMethod (REST).
// What each test checks: telemetry reaches the hub (read back through Muster's telemetry
// listing, the service side's view of it); a cloud-to-device message (sent through Muster's
// REST extension) arrives with its properties and, completed, leaves the queue, while an
// abandoned one comes again; twin get and a reported patch; a desired patch pushed to the
// device; a direct method invoked with Client.invokeDeviceMethod and answered; a wrong key
// is refused at put-token.
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/hub-amqp.test.js
'use strict';

const { test, describe, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const https = require('node:https');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');
const { SharedAccessSignature } = require('azure-iot-common');
const { Client: ServiceClient, Registry } = require('azure-iothub');
const { makeCert, cleanup } = require('./certs');

const HUB_CONNECTION_STRING = process.env.MUSTER_HUB_CONNECTION_STRING;
if (!HUB_CONNECTION_STRING || !process.env.NODE_EXTRA_CA_CERTS) {
  throw new Error(
    'MUSTER_HUB_CONNECTION_STRING / NODE_EXTRA_CA_CERTS are not set: run these tests through ' +
    'tests/interop/muster_server.py (see tests/interop/README.md)'
  );
}
const HUB = Object.fromEntries(HUB_CONNECTION_STRING.split(';').map((p) => {
  const i = p.indexOf('=');
  return [p.slice(0, i), p.slice(i + 1)];
}));
const HOST = HUB.HostName;
const API_VERSION = '2021-04-12';
const TEST_TIMEOUT_MS = 60000;
const WAIT_MS = 30000; // bound for every condition the tests wait for

// Muster's service-side REST extensions for what Azure hands to Event Hubs and service AMQP.
const telemetryPath = (id) => `/devices/${encodeURIComponent(id)}/telemetry`;
const c2dPath = (id) => `/devices/${encodeURIComponent(id)}/messages/cloudToDevice`;

const registry = Registry.fromConnectionString(HUB_CONNECTION_STRING);
const serviceClient = ServiceClient.fromConnectionString(HUB_CONNECTION_STRING);

const TRANSPORTS = [Amqp, AmqpWs];

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

// Polls `condition` (async, truthy = done) every 100 ms until `WAIT_MS`.
async function waitFor(what, condition) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${WAIT_MS} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
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

// A service request to the hub's REST API with a token of the connection string's policy.
function hubRequest(method, path, body = null, headers = {}) {
  const expiry = Math.floor(Date.now() / 1000) + 3600;
  const token = SharedAccessSignature.create(HOST, HUB.SharedAccessKeyName, HUB.SharedAccessKey, expiry).toString();
  const sep = path.includes('?') ? '&' : '?';
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: HOST, port: 443, method, path: `${path}${sep}api-version=${API_VERSION}`,
      headers: { authorization: token, ...headers },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    if (body !== null) req.write(body);
    req.end();
  });
}

async function storedTelemetry(deviceId) {
  const r = await hubRequest('GET', telemetryPath(deviceId));
  assert.equal(r.status, 200, r.body);
  return JSON.parse(r.body);
}

async function sendC2d(deviceId, body, headers = {}) {
  const r = await hubRequest('POST', c2dPath(deviceId), body, headers);
  assert.equal(r.status, 204, r.body);
}

const openClients = [];
after(async () => {
  for (const c of openClients) {
    await c.close().catch(() => {});
  }
  cleanup();
});

async function sasDevice(prefix, transport) {
  const deviceId = unique(`${prefix}-${transport.name.toLowerCase()}`);
  const { responseBody: device } = await registry.create({ deviceId });
  const key = device.authentication.symmetricKey.primaryKey;
  const client = DeviceClient.fromConnectionString(
    `HostName=${HOST};DeviceId=${deviceId};SharedAccessKey=${key}`, transport);
  openClients.push(client);
  return { deviceId, key, client };
}

describe('the hub over AMQP with a SAS token (CBS put-token)', () => {
  for (const transport of TRANSPORTS) {
    test(`${transport.name}: telemetry, cloud-to-device, twin, direct method`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const { deviceId, client } = await sasDevice('node-hub-amqp', transport);
      await client.open();
      const { responseBody: connected } = await registry.get(deviceId);
      assert.equal(connected.connectionState, 'Connected');

      // Telemetry with system and application properties reaches the hub.
      const event = new Message(JSON.stringify({ temperature: 21.5 }));
      event.messageId = 'm-1';
      event.contentType = 'application/json';
      event.contentEncoding = 'utf-8';
      event.properties.add('alert', 'high');
      await client.sendEvent(event);
      const [stored] = await waitFor('the telemetry message', async () => {
        const list = await storedTelemetry(deviceId);
        return list.length > 0 && list;
      });
      assert.deepEqual(JSON.parse(stored.body), { temperature: 21.5 });
      assert.equal(stored.properties.alert, 'high');
      assert.equal(stored.systemProperties.messageId, 'm-1');
      assert.equal(stored.systemProperties.contentType, 'application/json');

      // Cloud-to-device: the first is abandoned and comes again, then completed; the
      // second arrives after it (one at a time, in order).
      const received = [];
      const second = waiter('the second cloud-to-device message', (m) => m.data.toString() === 'second');
      client.on('message', (msg) => {
        received.push(msg);
        if (msg.data.toString() === 'first' && received.filter((m) => m.data.toString() === 'first').length === 1) {
          client.abandon(msg, () => {});
        } else {
          client.complete(msg, () => {});
        }
        second.push(msg);
      });
      await sendC2d(deviceId, 'first', { 'iothub-messageid': 'c2d-1', 'iothub-app-color': 'red' });
      await sendC2d(deviceId, 'second', { 'iothub-messageid': 'c2d-2' });
      await second.promise;
      assert.deepEqual(received.map((m) => m.data.toString()), ['first', 'first', 'second']);
      assert.equal(received[0].messageId, 'c2d-1');
      assert.equal(received[0].properties.getValue('color'), 'red');

      // The twin: get, a reported patch, then a desired patch pushed to the device.
      const twin = await client.getTwin();
      assert.equal(typeof twin.properties.desired.$version, 'number');
      await new Promise((resolve, reject) => twin.properties.reported.update(
        { firmware: '1.2.3', transport: transport.name }, (err) => (err ? reject(err) : resolve())));
      const { responseBody: serviceTwin } = await registry.getTwin(deviceId);
      assert.equal(serviceTwin.properties.reported.firmware, '1.2.3');
      assert.equal(serviceTwin.properties.reported.transport, transport.name);
      const patch = waiter('the desired patch', (d) => d.interval === 7);
      twin.on('properties.desired', patch.push);
      // The SDK subscribes when the listener is added: wait until the hub pushes to it.
      await waitFor('the desired patch to arrive', async () => {
        await registry.updateTwin(deviceId, { properties: { desired: { interval: 7 } } }, '*');
        return Promise.race([patch.promise.then(() => true), new Promise((r) => setTimeout(() => r(false), 500))]);
      });
      assert.equal((await patch.promise).interval, 7);

      // A direct method through the service side.
      client.onDeviceMethod('reboot', (request, response) => {
        response.send(200, { echo: request.payload, via: transport.name }, () => {});
      });
      const { result } = await serviceClient.invokeDeviceMethod(deviceId, {
        methodName: 'reboot', payload: { delay: 3 }, responseTimeoutInSeconds: 20, connectTimeoutInSeconds: 10,
      });
      assert.equal(result.status, 200, JSON.stringify(result));
      assert.deepEqual(result.payload, { echo: { delay: 3 }, via: transport.name });

      await client.close();
      await waitFor('the device to show as disconnected', async () =>
        (await registry.get(deviceId)).responseBody.connectionState === 'Disconnected');
    });
  }

  test('a wrong key is refused at put-token', { timeout: TEST_TIMEOUT_MS }, async () => {
    const deviceId = unique('node-hub-amqp-badkey');
    await registry.create({ deviceId });
    const wrongKey = crypto.randomBytes(32).toString('base64');
    const client = DeviceClient.fromConnectionString(
      `HostName=${HOST};DeviceId=${deviceId};SharedAccessKey=${wrongKey}`, Amqp);
    openClients.push(client);
    await assert.rejects(client.open(), (err) => {
      assert.match(`${err.name} ${err.message}`, /Unauthorized|putToken/i, err.stack);
      return true;
    });
    assert.equal((await registry.get(deviceId)).responseBody.connectionState, 'Disconnected');
  });
});

describe('the hub over AMQP with an X.509 device', () => {
  for (const transport of TRANSPORTS) {
    test(`${transport.name}: telemetry and twin with a self-signed certificate`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const deviceId = unique(`node-hub-amqp-x509-${transport.name.toLowerCase()}`);
      const cert = makeCert(deviceId);
      await registry.create({
        deviceId,
        authentication: {
          type: 'selfSigned',
          x509Thumbprint: { primaryThumbprint: cert.sha256, secondaryThumbprint: cert.sha256 },
        },
      });
      const client = DeviceClient.fromConnectionString(
        `HostName=${HOST};DeviceId=${deviceId};x509=true`, transport);
      openClients.push(client);
      await client.setOptions({ cert: cert.pem, key: cert.key });
      await client.open();
      await client.sendEvent(new Message('x509-hello'));
      const list = await waitFor('the telemetry message', async () => {
        const l = await storedTelemetry(deviceId);
        return l.length > 0 && l;
      });
      assert.equal(list[0].body, 'x509-hello');
      const twin = await client.getTwin();
      await new Promise((resolve, reject) => twin.properties.reported.update(
        { x509: true }, (err) => (err ? reject(err) : resolve())));
      const { responseBody: serviceTwin } = await registry.getTwin(deviceId);
      assert.equal(serviceTwin.properties.reported.x509, true);
      await client.close();
    });
  }
});
