// The built-in hub as long-lived devices and bulk tooling use it, with Microsoft's Node SDKs:
//   azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4 (Mqtt, MqttWs) with a short SAS
//     lifetime (`setOptions({tokenRenewal: {tokenValidTimeInSeconds, tokenRenewalMarginInSeconds}})`):
//     the SDK renews the token by reconnecting with CleanSession=0 and does not subscribe
//     again, so the hub must resume the session; after the renewal the device still gets a
//     desired-property patch and answers a direct method;
//   azure-iothub 1.16.6: Registry.updateTwin (every desired update bumps $version, equal
//     values too; `desired: null` clears the collection), Registry.addDevices / updateDevices /
//     removeDevices (POST /devices, the bulk registry API), device-scope refusals;
//     Client.invokeDeviceMethod.
//
// Run through the server wrapper (NODE_EXTRA_CA_CERTS must be set when node starts):
//
//   .interop/venv/bin/python tests/interop/muster_server.py -- \
//       node --test tests/interop/node/hub.test.js
//
// All tests share that one server; every test uses its own device ids.
//
// Against a cluster (MUSTER_CLUSTER=3 for the wrapper, scripts/cluster.sh), one more test
// reaches a device whose session sits on another node: the nodes share one address and port
// (the kernel picks the node of each connection), and the wrapper passes each node's admin
// URL (MUSTER_CLUSTER_ADMIN_URLS) and its own extra address, if it has one
// (MUSTER_CLUSTER_NODE_ADDRS, comma-separated, empty for none). The test connects the
// device through the shared address until the pinned node's admin /metrics shows the
// connection went elsewhere, then makes the service calls through the pinned node only.
'use strict';

const { test, describe, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Client: DeviceClient } = require('azure-iot-device');
const HubMqtt = require('azure-iot-device-mqtt');
const { Client: ServiceClient, Registry } = require('azure-iothub');
const https = require('node:https');
const tls = require('node:tls');

const HUB_CONNECTION_STRING = process.env.MUSTER_HUB_CONNECTION_STRING;
if (!HUB_CONNECTION_STRING || !process.env.NODE_EXTRA_CA_CERTS) {
  throw new Error(
    'MUSTER_HUB_CONNECTION_STRING / NODE_EXTRA_CA_CERTS are not set: run these tests through ' +
    'tests/interop/muster_server.py (see tests/interop/README.md)'
  );
}
const HOST = Object.fromEntries(HUB_CONNECTION_STRING.split(';').map((p) => {
  const i = p.indexOf('=');
  return [p.slice(0, i), p.slice(i + 1)];
})).HostName;
const TEST_TIMEOUT_MS = 60000;
const WAIT_MS = 30000; // bound for every condition the tests wait for

const registry = Registry.fromConnectionString(HUB_CONNECTION_STRING);
// Constructed with its default AMQP transport, which is never opened: invokeDeviceMethod
// uses the REST API client.
const serviceClient = ServiceClient.fromConnectionString(HUB_CONNECTION_STRING);

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(5).toString('hex')}`;
}

function userProps(obj) {
  return Object.fromEntries(Object.entries(obj || {}).filter(([k]) => !k.startsWith('$')));
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

// Expects `fn` to reject with HTTP `status`; returns the parsed response body.
async function expectHttpError(status, fn) {
  let err;
  try {
    await fn();
  } catch (e) {
    err = e;
  }
  assert.ok(err, `expected HTTP ${status}, but the call succeeded`);
  assert.ok(err.response, `expected an HTTP error, got ${err && err.stack}`);
  assert.equal(err.response.statusCode, status, String(err.responseBody));
  return JSON.parse(err.responseBody);
}

const openClients = [];
after(async () => {
  for (const c of openClients) {
    await c.close().catch(() => {});
  }
});

describe('a device keeps its session across SAS token renewal', () => {
  for (const transport of [HubMqtt.Mqtt, HubMqtt.MqttWs]) {
    test(`${transport.name}: desired patch and direct method after renewal`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const deviceId = unique(`node-renew-${transport.name.toLowerCase()}`);
      const { responseBody: device } = await registry.create({ deviceId });
      const key = device.authentication.symmetricKey.primaryKey;
      const client = DeviceClient.fromConnectionString(
        `HostName=${HOST};DeviceId=${deviceId};SharedAccessKey=${key}`, transport);
      openClients.push(client);
      // A token valid 15 s, renewed 10 s before it expires: the first renewal after ~5 s.
      await client.setOptions({ tokenRenewal: { tokenValidTimeInSeconds: 15, tokenRenewalMarginInSeconds: 10 } });
      await client.open();

      let marker = null;
      const patches = [];
      const patchSeen = () => patches.some((p) => p.marker === marker);
      const twin = await client.getTwin();
      twin.on('properties.desired', (delta) => patches.push(delta));
      let calls = 0;
      client.onDeviceMethod('ping', (request, response) => {
        calls += 1;
        response.send(200, { call: calls, payload: request.payload }, () => {});
      });

      // Both subscriptions work before the renewal (invoke waits up to 10 s for the
      // methods subscription).
      const roundTrip = async (m) => {
        marker = m;
        await registry.updateTwin(deviceId, { properties: { desired: { marker: m } } }, '*');
        await waitFor(`desired patch ${m}`, patchSeen);
        const { result } = await serviceClient.invokeDeviceMethod(deviceId, {
          methodName: 'ping', payload: { m }, responseTimeoutInSeconds: 20, connectTimeoutInSeconds: 10,
        });
        assert.equal(result.status, 200, JSON.stringify(result));
        assert.deepEqual(result.payload.payload, { m });
      };
      await roundTrip('before');
      const { responseBody: before } = await registry.get(deviceId);

      // The renewal: a new connection with a fresh token (the hub records each connect).
      await waitFor('the SDK to renew its SAS token and reconnect', async () => {
        const { responseBody: d } = await registry.get(deviceId);
        return d.connectionState === 'Connected' &&
          d.connectionStateUpdatedTime !== before.connectionStateUpdatedTime;
      });
      await roundTrip('after');
      assert.equal(calls, 2);
    });
  }
});

describe('twin versions through Registry.updateTwin', () => {
  test('equal values bump $version; desired: null clears the collection', { timeout: TEST_TIMEOUT_MS }, async () => {
    const deviceId = unique('node-twin');
    await registry.create({ deviceId });
    const update = async (patch) => (await registry.updateTwin(deviceId, patch, '*')).responseBody;

    const first = await update({ properties: { desired: { a: 1, b: { c: 2 } } } });
    assert.equal(first.properties.desired.$version, 2);
    const again = await update({ properties: { desired: { a: 1 } } });
    assert.equal(again.properties.desired.$version, 3, JSON.stringify(again.properties.desired));
    assert.equal(again.properties.desired.$metadata.a.$lastUpdatedVersion, 3);
    assert.equal(again.properties.desired.$metadata.b.$lastUpdatedVersion, 2);

    // A connected device hears the equal-value update too.
    const { responseBody: device } = await registry.get(deviceId);
    const client = DeviceClient.fromConnectionString(
      `HostName=${HOST};DeviceId=${deviceId};SharedAccessKey=${device.authentication.symmetricKey.primaryKey}`,
      HubMqtt.Mqtt);
    openClients.push(client);
    await client.open();
    const deviceTwin = await client.getTwin();
    const seen = waiter('the equal-value patch', (d) => d.$version === 4);
    deviceTwin.on('properties.desired', seen.push);
    await update({ properties: { desired: { a: 1 } } });
    assert.equal((await seen.promise).a, 1);

    // desired: null removes every desired property and bumps the version.
    const cleared = waiter('the clearing patch', (d) => d.$version === 5);
    deviceTwin.on('properties.desired', cleared.push);
    const empty = await update({ properties: { desired: null } });
    assert.deepEqual(userProps(empty.properties.desired), {});
    assert.equal(empty.properties.desired.$version, 5);
    const patch = await cleared.promise;
    assert.deepEqual(userProps(patch), { a: null, b: null });
    const { responseBody: read } = await registry.getTwin(deviceId);
    assert.deepEqual(userProps(read.properties.desired), {});
    await client.close();
  });
});

describe('bulk registry (POST /devices)', () => {
  test('addDevices, updateDevices, removeDevices with per-device errors', { timeout: TEST_TIMEOUT_MS }, async () => {
    const ids = [unique('node-bulk'), unique('node-bulk'), unique('node-bulk')];
    const { responseBody: added } = await registry.addDevices(ids.map((deviceId) => ({ deviceId, status: 'enabled' })));
    assert.deepEqual(added, { isSuccessful: true, errors: [], warnings: [] });
    const devices = await Promise.all(ids.map(async (id) => (await registry.get(id)).responseBody));
    assert.deepEqual(devices.map((d) => d.status), ['enabled', 'enabled', 'enabled']);

    const { responseBody: updated } = await registry.updateDevices(
      devices.map((d) => ({ ...d, status: 'disabled' })), true);
    assert.equal(updated.isSuccessful, true, JSON.stringify(updated));
    assert.equal((await registry.get(ids[1])).responseBody.status, 'disabled');

    // Stale etags (the ones read before the update): refused per device with 400.
    const stale = await expectHttpError(400, () => registry.removeDevices(devices, false));
    assert.equal(stale.isSuccessful, false);
    assert.deepEqual(stale.errors.map((e) => [e.deviceId, e.errorCode]),
      ids.map((id) => [id, 'PreconditionFailed']));
    assert.ok(stale.errors.every((e) => typeof e.errorStatus === 'string' && e.errorStatus.length > 0));
    assert.deepEqual(stale.warnings, []);
    // Adding an existing device is a per-device DeviceAlreadyExists.
    const exists = await expectHttpError(400, () => registry.addDevices([{ deviceId: ids[0] }]));
    assert.deepEqual(exists.errors.map((e) => [e.deviceId, e.errorCode]), [[ids[0], 'DeviceAlreadyExists']]);

    const current = await Promise.all(ids.map(async (id) => (await registry.get(id)).responseBody));
    const { responseBody: removed } = await registry.removeDevices(current, false);
    assert.equal(removed.isSuccessful, true, JSON.stringify(removed));
    for (const id of ids) {
      const gone = await expectHttpError(404, () => registry.get(id));
      assert.match(gone.Message, /^ErrorCode:DeviceNotFound;/);
    }
  });
});

describe('device scope', () => {
  test('deviceScope must name an IoT Edge device of this hub', { timeout: TEST_TIMEOUT_MS }, async () => {
    const { responseBody: edge } = await registry.create({ deviceId: unique('node-edge'), capabilities: { iotEdge: true } });
    assert.match(edge.deviceScope, /^ms-azure-iot-edge:\/\//);
    const { responseBody: leaf } = await registry.create({ deviceId: unique('node-leaf'), deviceScope: edge.deviceScope });
    assert.equal(leaf.deviceScope, edge.deviceScope);
    assert.deepEqual(leaf.parentScopes, [edge.deviceScope]);

    for (const body of [
      { deviceScope: 'ms-azure-iot-edge://nobody-637000000000000000' },
      { deviceScope: `ms-azure-iot-edge://${leaf.deviceId}-1` },
      { deviceScope: edge.deviceScope, parentScopes: ['ms-azure-iot-edge://other-1'] },
      { capabilities: { iotEdge: true }, deviceScope: edge.deviceScope },
    ]) {
      let err;
      try {
        await registry.create({ deviceId: unique('node-bad'), ...body });
      } catch (e) {
        err = e;
      }
      assert.ok(err, `accepted ${JSON.stringify(body)}`);
      assert.equal(err.response.statusCode, 400, String(err.responseBody));
      assert.match(String(err.responseBody), /ErrorCode:InvalidDeviceScope;/);
    }
    // And on update.
    let err;
    try {
      await registry.update({ ...leaf, deviceScope: 'ms-azure-iot-edge://nobody-1', parentScopes: [] });
    } catch (e) {
      err = e;
    }
    assert.ok(err, 'update with a bad scope was accepted');
    assert.equal(err.response.statusCode, 400);
    assert.equal((await registry.get(leaf.deviceId)).responseBody.deviceScope, edge.deviceScope);
  });
});

const CLUSTER_ADMIN = (process.env.MUSTER_CLUSTER_ADMIN_URLS || '').split(',').filter(Boolean);
const CLUSTER_ADDRS = (process.env.MUSTER_CLUSTER_NODE_ADDRS || '').split(',');
const PINNED = CLUSTER_ADDRS.findIndex(Boolean);

// Open MQTT connections on one node, from its admin listener's Prometheus text.
async function openMqtt(adminUrl) {
  const text = await (await fetch(`${adminUrl}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith('muster_open_connections{listener="mqtt"}'));
  return line ? Number(line.split(' ').pop()) : 0;
}

// An agent whose connections all go to one node's own address, whatever host the request
// names (the Host header, the SAS audience and the certificate check stay the hub's).
class PinnedAgent extends https.Agent {
  constructor(address) {
    super({ keepAlive: true });
    this.address = address;
  }

  createConnection(options, callback) {
    return tls.connect({ ...options, host: this.address, servername: undefined }, callback);
  }
}

describe('cluster: a device on another node', { skip: PINNED < 0 && 'not a cluster with a node address (MUSTER_CLUSTER_NODE_ADDRS)' }, () => {
  test('direct method, C2D and twin through the pinned node reach the device elsewhere', { timeout: 2 * TEST_TIMEOUT_MS }, async () => {
    const pinned = ServiceClient.fromConnectionString(HUB_CONNECTION_STRING);
    // The SDK's REST client takes its agent from setOptions; the Client sets one keep-alive
    // agent there in its constructor, replaced here by the pinned one.
    pinned._restApiClient.setOptions({ http: { agent: new PinnedAgent(CLUSTER_ADDRS[PINNED]) } });
    const deviceId = unique('node-cluster');
    const { responseBody: device } = await registry.create({ deviceId });
    const key = device.authentication.symmetricKey.primaryKey;

    let client;
    for (let attempt = 1; ; attempt += 1) {
      const before = await openMqtt(CLUSTER_ADMIN[PINNED]);
      client = DeviceClient.fromConnectionString(
        `HostName=${HOST};DeviceId=${deviceId};SharedAccessKey=${key}`, HubMqtt.Mqtt);
      await client.open();
      if (await openMqtt(CLUSTER_ADMIN[PINNED]) === before) break;
      await client.close();
      assert.ok(attempt < 20, 'the kernel sent every connection to the pinned node');
    }
    openClients.push(client);
    const calls = waiter('the direct method');
    client.onDeviceMethod('where', (request, response) => {
      calls.push(request.payload);
      response.send(200, { seen: request.payload }, () => {});
    });
    const messages = waiter('the cloud-to-device message');
    client.on('message', (msg) => {
      messages.push(msg.getData().toString());
      client.complete(msg, () => {});
    });
    const twin = await client.getTwin();
    const patches = waiter('the desired patch', (p) => p.pinned === true);
    twin.on('properties.desired', (delta) => patches.push(delta));

    const { result } = await pinned.invokeDeviceMethod(deviceId, {
      methodName: 'where', payload: { via: 'pinned' }, responseTimeoutInSeconds: 20, connectTimeoutInSeconds: 10,
    });
    assert.equal(result.status, 200, JSON.stringify(result));
    assert.deepEqual(result.payload, { seen: { via: 'pinned' } });
    assert.deepEqual(await calls.promise, { via: 'pinned' });

    // C2D through Muster's REST extension on the pinned node (the SDK's Client.send is AMQP).
    const cs = Object.fromEntries(HUB_CONNECTION_STRING.split(';').map((p) => [p.slice(0, p.indexOf('=')), p.slice(p.indexOf('=') + 1)]));
    const token = require('azure-iot-common').SharedAccessSignature.create(
      HOST, cs.SharedAccessKeyName, cs.SharedAccessKey, Math.floor(Date.now() / 1000) + 600).toString();
    const status = await new Promise((resolve, reject) => {
      const req = https.request({
        host: HOST, method: 'POST', agent: new PinnedAgent(CLUSTER_ADDRS[PINNED]),
        path: `/devices/${deviceId}/messages/cloudToDevice?api-version=2021-04-12`,
        headers: { authorization: token, 'content-type': 'text/plain' },
      }, (res) => { res.resume(); resolve(res.statusCode); });
      req.on('error', reject);
      req.end('through the pinned node');
    });
    assert.equal(status, 204);
    assert.equal(await messages.promise, 'through the pinned node');

    // A desired-property update made on the pinned node reaches the device's session.
    const pinnedRegistry = Registry.fromConnectionString(HUB_CONNECTION_STRING);
    pinnedRegistry._restApiClient.setOptions({ http: { agent: new PinnedAgent(CLUSTER_ADDRS[PINNED]) } });
    await pinnedRegistry.updateTwin(deviceId, { properties: { desired: { pinned: true } } }, '*');
    await patches.promise;
  });
});
