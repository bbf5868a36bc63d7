// Document sync between stock y-websocket (v3) providers through tandem.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { startTandem } from '../lib/server.js'
import { Clients, contents, sleep, uniqueRoom, waitConverged, waitFor, waitSynced } from '../lib/clients.js'

/**
 * Every client makes `rounds` edits: a chunk `[<name>:<round>]` at the start or the end of the
 * shared text (so that no later edit splits it), its own map key, and the contested key 'last'.
 * All clients edit in the same tick, then yield a few ms, so updates cross on the wire.
 */
async function editConcurrently (clients, rounds) {
  const chunks = []
  for (let r = 0; r < rounds; r++) {
    clients.forEach(({ doc, name }) => {
      const text = doc.getText('text')
      const chunk = `[${name}:${r}]`
      chunks.push(chunk)
      doc.transact(() => {
        text.insert(Math.random() < 0.5 ? 0 : text.length, chunk)
        doc.getMap('map').set(`${name}`, r)
        doc.getMap('map').set('last', `${name}:${r}`)
      })
    })
    await sleep(Math.floor(Math.random() * 4))
  }
  return chunks
}

function assertAllChunks (text, chunks) {
  const missing = chunks.filter((c) => !text.includes(c))
  assert.deepEqual(missing, [], 'every inserted chunk is in the converged text')
  assert.equal(text.length, chunks.reduce((n, c) => n + c.length, 0), 'no extra or duplicated text')
}

describe('y-websocket v3 document sync', { timeout: 120_000 }, () => {
  let server
  const clients = new Clients()
  before(async () => { server = await startTandem() })
  after(async () => {
    clients.destroyAll()
    if (server) {
      const exit = await server.stop()
      assert.equal(exit.code, 0, `tandem exited with ${JSON.stringify(exit)} on SIGTERM\n${server.logs()}`)
    }
  })

  test('healthz answers 200', { timeout: 10_000 }, async () => {
    const res = await fetch(`${server.httpUrl}/healthz`)
    assert.equal(res.status, 200)
  })

  test('two providers edit one Y.Text and one Y.Map concurrently and converge', { timeout: 30_000 }, async () => {
    const room = uniqueRoom('two')
    const a = { ...clients.connect(server, room), name: 'a' }
    const b = { ...clients.connect(server, room), name: 'b' }
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])

    const chunks = await editConcurrently([a, b], 40)
    const result = await waitConverged([a.doc, b.doc])

    assertAllChunks(result.text, chunks)
    assert.equal(result.map.a, 39)
    assert.equal(result.map.b, 39)
    assert.match(result.map.last, /^[ab]:39$/)
  })

  test('ten providers edit concurrently and converge', { timeout: 60_000 }, async () => {
    const room = uniqueRoom('ten')
    const peers = Array.from({ length: 10 }, (_, i) => ({ ...clients.connect(server, room), name: `p${i}` }))
    await Promise.all(peers.map((p) => waitSynced(p.provider)))

    const chunks = await editConcurrently(peers, 10)
    const result = await waitConverged(peers.map((p) => p.doc), { timeoutMs: 30_000 })

    assertAllChunks(result.text, chunks)
    for (let i = 0; i < 10; i++) assert.equal(result.map[`p${i}`], 9, `map key p${i}`)
    assert.equal(Object.keys(result.map).length, 11)
  })

  test('a late joiner receives the whole document (about 100 KiB in 200 updates)', { timeout: 30_000 }, async () => {
    const room = uniqueRoom('late')
    const writer = clients.connect(server, room)
    await waitSynced(writer.provider)
    const text = writer.doc.getText('text')
    for (let i = 0; i < 200; i++) text.insert(text.length, `${String(i).padStart(4, '0')}:${'x'.repeat(507)}\n`)
    writer.doc.getMap('map').set('done', true)

    const reader = clients.connect(server, room)
    await waitSynced(reader.provider)
    const got = await waitConverged([writer.doc, reader.doc])
    assert.equal(got.text.length, 200 * 513)
    assert.equal(got.map.done, true)
  })

  test('a room name containing "/" works and is its own room', { timeout: 30_000 }, async () => {
    const room = `${uniqueRoom('team')}/doc-1`
    const a = clients.connect(server, room)
    const b = clients.connect(server, room)
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])
    a.doc.getText('text').insert(0, 'slash room')
    b.doc.getMap('map').set('from', 'b')
    const result = await waitConverged([a.doc, b.doc])
    assert.deepEqual(result, { text: 'slash room', map: { from: 'b' } })

    // The parent path, the last segment and a sibling are different rooms.
    const parent = room.slice(0, room.indexOf('/'))
    for (const other of [parent, 'doc-1', `${parent}/doc-2`]) {
      const c = clients.connect(server, other)
      await waitSynced(c.provider)
      await sleep(200)
      assert.deepEqual(contents(c.doc), { text: '', map: {} }, `room "${other}" must be empty`)
    }
  })

  test('room names with spaces, percent signs and non-ASCII characters work', { timeout: 30_000 }, async () => {
    // The provider puts the name into the URL as is; the WebSocket client percent-encodes it.
    const suffix = uniqueRoom('x')
    const names = [`notes ${suffix}`, `ünïcödé-${suffix}`, `100%-${suffix}`]
    for (const room of names) {
      const a = clients.connect(server, room)
      const b = clients.connect(server, room)
      await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])
      a.doc.getText('text').insert(0, room)
      const result = await waitConverged([a.doc, b.doc])
      assert.equal(result.text, room)
    }
    // A later joiner with the same name lands in the same room.
    const again = clients.connect(server, names[1])
    await waitSynced(again.provider)
    await waitFor(() => contents(again.doc).text === names[1], { timeoutMs: 5_000, what: `room "${names[1]}" content` })
  })

  test('a provider with params (?token=abc) joins the room named by the path only', { timeout: 30_000 }, async () => {
    const room = uniqueRoom('params')
    const withToken = clients.connect(server, room, { params: { token: 'abc' } })
    assert.match(withToken.provider.url, /\?token=abc$/)
    const withOther = clients.connect(server, room, { params: { token: 'def', x: '1' } })
    const plain = clients.connect(server, room)

    await Promise.all([withToken, withOther, plain].map((c) => waitSynced(c.provider)))
    assert.ok(withToken.provider.synced, 'the provider with a token synced')

    withToken.doc.getText('text').insert(0, 'token ')
    plain.doc.getMap('map').set('plain', true)
    withOther.doc.getText('text').insert(0, 'other ')
    const result = await waitConverged([withToken.doc, withOther.doc, plain.doc])
    assert.equal(result.text.length, 'token other '.length)
    assert.deepEqual(result.map, { plain: true })
  })

  test('edits keep flowing to a provider that reconnects', { timeout: 30_000 }, async () => {
    const room = uniqueRoom('reconnect')
    const a = clients.connect(server, room)
    const b = clients.connect(server, room)
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])
    b.provider.disconnect()
    a.doc.getText('text').insert(0, 'while b was away; ')
    b.doc.getText('text').insert(0, 'offline edit by b; ')
    await sleep(100)
    b.provider.connect()
    await waitSynced(b.provider)
    const result = await waitConverged([a.doc, b.doc])
    assert.equal(result.text.length, 'while b was away; offline edit by b; '.length)
    assert.ok(result.text.includes('while b was away; ') && result.text.includes('offline edit by b; '))
  })
})
