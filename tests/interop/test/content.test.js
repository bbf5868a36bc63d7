// Every kind of content stock Yjs writes passes tandem's update checks (the structure reader and
// the dependency check of protocol/PROTOCOL.md): formatted text with embeds, nested values of
// every JSON-like type, nested shared types, XML, deletions, undo; edited concurrently by two
// providers, and a newcomer syncing the result.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { startTandem } from '../lib/server.js'
import { Clients, Y, sleep, uniqueRoom, waitFor, waitSynced } from '../lib/clients.js'

/** `v` with object keys sorted (map entries come in insertion order, which differs per doc). */
function canonical (v) {
  if (typeof v === 'bigint') return `${v}n`
  if (v instanceof Uint8Array) return Array.from(v)
  if (Array.isArray(v)) return v.map(canonical)
  if (v && typeof v === 'object') {
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]))
  }
  return v
}

/** Everything the test writes, as JSON (XML as its string form). */
function snapshot (doc) {
  return JSON.stringify(canonical({
    rich: doc.getText('rich').toDelta(),
    values: doc.getMap('values').toJSON(),
    list: doc.getArray('list').toJSON(),
    xml: doc.getXmlFragment('xml').toString()
  }))
}

/** Where two snapshots first differ, with some context. */
function difference (x, y) {
  let i = 0
  while (i < x.length && x[i] === y[i]) i++
  return `first difference at ${i} of ${x.length}/${y.length}:\n    ${x.slice(Math.max(0, i - 150), i + 250)}\n    ${y.slice(Math.max(0, i - 150), i + 250)}`
}

/** One round of edits of every kind by `doc`, tagged `tag`. */
function editEverything (doc, tag, round) {
  const rich = doc.getText('rich')
  const values = doc.getMap('values')
  const list = doc.getArray('list')
  const xml = doc.getXmlFragment('xml')
  doc.transact(() => {
    rich.insert(rich.length, `${tag}${round} é😀 `, { bold: round % 2 === 0 })
    rich.insertEmbed(rich.length, { image: `${tag}.png`, round })
    if (rich.length > 6) rich.format(1, 3, { italic: true, color: `#${round}${round}0` })
    if (rich.length > 12 && round % 3 === 2) rich.delete(2, 2)
    values.set(`${tag}-number`, round * 1.5)
    values.set(`${tag}-int`, round - 7)
    values.set(`${tag}-big`, 2n ** 60n + BigInt(round))
    values.set(`${tag}-nested`, { a: [1, 'two', null, true, { deep: [[[round]]] }], b: { c: false } })
    values.set(`${tag}-bytes`, new Uint8Array([round, 255, 0]))
    values.set(`${tag}-undefined`, undefined)
    const sub = new Y.Map()
    values.set(`${tag}-map`, sub)
    sub.set('inner', `${tag}${round}`)
    const inner = new Y.Array()
    sub.set('list', inner)
    inner.push([round, `${tag}`])
    list.insert(0, [`${tag}${round}`, { round }, [round]])
    if (list.length > 5) list.delete(list.length - 2, 1)
    const para = new Y.XmlElement('p')
    para.setAttribute('data-round', `${round}`)
    const text = new Y.XmlText(`${tag} paragraph ${round}`)
    text.format(0, 3, { strong: true })
    para.insert(0, [text])
    xml.insert(xml.length, [para])
    if (xml.length > 3) xml.delete(0, 1)
  })
}

describe('every kind of Yjs content', { timeout: 120_000 }, () => {
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

  test('two providers edit every kind of content concurrently; nothing is refused', { timeout: 60_000 }, async () => {
    const room = uniqueRoom('content')
    const a = clients.connect(server, room)
    const b = clients.connect(server, room)
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])

    for (let round = 0; round < 12; round++) {
      editEverything(a.doc, 'a', round)
      editEverything(b.doc, 'b', round)
      await sleep(Math.floor(Math.random() * 5))
    }
    // Undo and redo produce updates of their own (deletions of many items, re-insertions).
    const undo = new Y.UndoManager([a.doc.getText('rich'), a.doc.getArray('list')])
    a.doc.getText('rich').insert(0, 'undone ')
    undo.stopCapturing()
    undo.undo()
    undo.redo()
    undo.undo()

    await waitFor(() => snapshot(a.doc) === snapshot(b.doc), {
      timeoutMs: 20_000,
      what: 'the two providers to converge',
      describe: () => difference(snapshot(a.doc), snapshot(b.doc))
    })
    assert.deepEqual(a.closes, [], 'a was never closed')
    assert.deepEqual(b.closes, [], 'b was never closed')

    // A newcomer gets exactly the same from the room.
    const c = clients.connect(server, room)
    await waitSynced(c.provider)
    await waitFor(() => snapshot(c.doc) === snapshot(a.doc), {
      what: 'the newcomer to hold the document',
      describe: () => difference(snapshot(a.doc), snapshot(c.doc))
    })
    assert.match(a.doc.getXmlFragment('xml').toString(), /<p data-round="11">/)
    assert.ok(a.doc.getText('rich').toDelta().some((op) => op.attributes?.italic), 'formatting kept')
  })

  test('a provider that joins with offline edits syncs them (its step 2 passes the checks)', { timeout: 30_000 }, async () => {
    const room = uniqueRoom('offline')
    const a = clients.connect(server, room)
    await waitSynced(a.provider)
    editEverything(a.doc, 'a', 0)
    // b edits a document of its own (the room's content merged in first), then connects.
    const doc = new Y.Doc()
    Y.applyUpdate(doc, Y.encodeStateAsUpdate(a.doc))
    editEverything(doc, 'b', 1)
    editEverything(doc, 'b', 2)
    const b = clients.connect(server, room, { doc })
    await waitSynced(b.provider)
    await waitFor(() => snapshot(a.doc) === snapshot(b.doc), {
      what: 'offline edits to reach the room',
      describe: () => difference(snapshot(a.doc), snapshot(b.doc))
    })
    assert.deepEqual(b.closes, [], 'b was never closed')
  })

  test('large messages (sent in WebSocket fragments) reach stock providers whole', { timeout: 30_000 }, async () => {
    const room = uniqueRoom('large')
    const a = clients.connect(server, room)
    await waitSynced(a.provider)
    // About 300 KB: the newcomer's step 2 and the live update are many 16 KiB fragments each.
    const chunk = '0123456789abcdef'.repeat(1024)
    a.doc.getText('t').insert(0, chunk.repeat(10))
    const b = clients.connect(server, room)
    await waitSynced(b.provider)
    await waitFor(() => b.doc.getText('t').length === chunk.length * 10, { what: 'the newcomer to get the large document' })
    a.doc.getText('t').insert(0, chunk.repeat(8))
    await waitFor(() => b.doc.getText('t').length === chunk.length * 18, { what: 'the large live update to arrive' })
    assert.equal(b.doc.getText('t').toString(), a.doc.getText('t').toString())
    assert.deepEqual(b.closes, [], 'b was never closed')
  })
})
