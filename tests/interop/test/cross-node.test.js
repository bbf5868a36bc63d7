// Two tandem nodes sharing a private redis-server (fan-out) and one SQLite store (one file, WAL,
// opened by both processes), with stock y-websocket v3 providers connected to different nodes.

import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { isDeepStrictEqual } from 'node:util'
import { after, before, describe, test } from 'node:test'
import { startTandem } from '../lib/server.js'
import { haveRedisServer, startRedis } from '../lib/redis.js'
import { Clients, contents, uniqueRoom, waitConverged, waitFor, waitSynced } from '../lib/clients.js'

const skip = haveRedisServer() ? false : 'redis-server not found (set REDIS_SERVER or install redis-server)'

const userOf = (observer, subject) => observer.provider.awareness.getStates().get(subject.doc.clientID)?.user
const statesOf = (c) => JSON.stringify(Object.fromEntries(c.provider.awareness.getStates()))

describe('two nodes over Redis with one shared store', { skip, timeout: 120_000 }, () => {
  let redis
  let dir
  const nodes = []
  const clients = new Clients()

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'tandem-interop-cluster-'))
    redis = await startRedis()
    const db = `sqlite://${path.join(dir, 'shared.db')}`
    // Node A first: it creates the database (and runs the migrations) before B opens it.
    for (const name of ['a', 'b']) {
      nodes.push(await startTandem({
        args: ['--database-url', db, '--redis-url', redis.url, '--node-id', `interop-${name}`]
      }))
    }
  })

  after(async () => {
    clients.destroyAll()
    for (const n of nodes) await n.stop().catch((e) => console.error(e))
    if (redis) await redis.stop()
    if (dir) await rm(dir, { recursive: true, force: true })
  })

  const nodeLogs = () => nodes.map((n, i) => `--- node ${'ab'[i]} log ---\n${n.logs()}`).join('\n')

  test('concurrent Y.Text and Y.Map edits on different nodes converge', { timeout: 40_000 }, async () => {
    const [A, B] = nodes
    const room = uniqueRoom('xnode-edit')
    const a = clients.connect(A, room)
    const b = clients.connect(B, room)
    const b2 = clients.connect(B, room)
    await Promise.all([a, b, b2].map((c) => waitSynced(c.provider)))

    // Interleaved bursts from both sides, without waiting for each other: real concurrency.
    const ta = a.doc.getText('text')
    const tb = b.doc.getText('text')
    for (let i = 0; i < 30; i++) {
      ta.insert(i % 3 === 0 ? 0 : ta.length, `a${i};`)
      tb.insert(i % 2 === 0 ? 0 : tb.length, `b${i};`)
      if (i % 10 === 5) {
        ta.delete(0, 1) // a deletion racing with b's inserts
      }
    }
    a.doc.getMap('map').set('fromA', 1)
    b.doc.getMap('map').set('fromB', 2)
    a.doc.getMap('map').set('both', 'a')
    b.doc.getMap('map').set('both', 'b')
    b2.doc.getMap('map').set('nested', { from: 'b2', n: [1, 2, 3] })

    let agreed
    try {
      agreed = await waitConverged([a.doc, b.doc, b2.doc])
    } catch (e) {
      e.message += `\n${nodeLogs()}`
      throw e
    }
    for (let i = 0; i < 30; i++) {
      assert.ok(agreed.text.includes(`b${i};`), `b${i} missing from ${agreed.text}`)
      // a's deletions removed the first character of the text, which may be part of any piece.
      if (i > 2) assert.ok(agreed.text.includes(`${i};`), `${i} missing from ${agreed.text}`)
    }
    assert.equal(agreed.map.fromA, 1)
    assert.equal(agreed.map.fromB, 2)
    assert.ok(['a', 'b'].includes(agreed.map.both), `both = ${agreed.map.both}`)
    assert.deepEqual(agreed.map.nested, { from: 'b2', n: [1, 2, 3] })

    // A late joiner on either node gets the whole document. Compared structurally: the key order
    // of a JSON object value is not kept (yrs re-encodes it from a hash map).
    for (const [i, node] of [A, B].entries()) {
      const late = clients.connect(node, room)
      await waitSynced(late.provider)
      await waitFor(() => isDeepStrictEqual(contents(late.doc), agreed), {
        what: `a late joiner on node ${'ab'[i]} (${node.host}) to see the document`,
        describe: () => `${JSON.stringify(contents(late.doc))}\nexpected:      ${JSON.stringify(agreed)}\n${nodeLogs()}`
      })
    }
  })

  test('awareness set on node A is seen on node B, changes follow, and a leaver disappears', { timeout: 40_000 }, async () => {
    const [A, B] = nodes
    const room = uniqueRoom('xnode-aw')
    const a = clients.connect(A, room)
    const b = clients.connect(B, room)
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])

    a.provider.awareness.setLocalStateField('user', { name: 'alice', node: 'a' })
    await waitFor(() => userOf(b, a)?.name === 'alice', { what: "b (node B) to see a's state", describe: () => statesOf(b) })

    b.provider.awareness.setLocalStateField('user', { name: 'bob', node: 'b' })
    await waitFor(() => userOf(a, b)?.name === 'bob', { what: "a (node A) to see b's state", describe: () => statesOf(a) })

    a.provider.awareness.setLocalStateField('user', { name: 'alice2', node: 'a' })
    await waitFor(() => userOf(b, a)?.name === 'alice2', { what: "b to see a's new state", describe: () => statesOf(b) })

    // A joiner on node B after the fact gets a's state too (node B's view of remote presence).
    const c = clients.connect(B, room)
    await waitSynced(c.provider)
    await waitFor(() => userOf(c, a)?.name === 'alice2', { what: "a joiner on node B to see a's state", describe: () => statesOf(c) })

    // A socket on node A that dies without a goodbye: node A must clear its state, across Redis.
    a.provider.shouldConnect = false
    a.provider.ws.terminate()
    await waitFor(() => !b.provider.awareness.getStates().has(a.doc.clientID), {
      timeoutMs: 10_000, what: "a's state to be removed at b (node B)", describe: () => statesOf(b)
    })
  })
})
