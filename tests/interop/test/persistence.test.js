// Documents survive tandem restarts (embedded SQLite in --data-dir).

import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { test } from 'node:test'
import { startTandem } from '../lib/server.js'
import { Clients, contents, sleep, uniqueRoom, waitConverged, waitFor, waitSynced } from '../lib/clients.js'

async function withDataDir (t) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tandem-interop-persist-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  return dir
}

function write (doc) {
  const text = doc.getText('text')
  for (let i = 0; i < 20; i++) text.insert(text.length, `line ${i}\n`)
  text.delete(0, 'line 0\n'.length)
  doc.getMap('map').set('title', 'persisted')
  doc.getMap('map').set('n', 42)
}

const expected = () => {
  let text = ''
  for (let i = 1; i < 20; i++) text += `line ${i}\n`
  return { text, map: { title: 'persisted', n: 42 } }
}

test('content survives a graceful restart (SIGTERM) and connected clients are told 1012', { timeout: 60_000 }, async (t) => {
  const dataDir = await withDataDir(t)
  const clients = new Clients()
  const servers = []
  t.after(async () => {
    clients.destroyAll()
    for (const s of servers) await s.kill()
  })
  const room = uniqueRoom('restart')

  const first = await startTandem({ dataDir })
  servers.push(first)
  const writer = clients.connect(first, room)
  await waitSynced(writer.provider)
  write(writer.doc)
  // A second client seeing the edits proves the server applied them.
  const witness = clients.connect(first, room)
  await waitSynced(witness.provider)
  await waitConverged([writer.doc, witness.doc])

  const exit = await first.stop()
  assert.equal(exit.code, 0, `tandem exited with ${JSON.stringify(exit)} on SIGTERM\n${first.logs()}`)
  await waitFor(() => writer.closes.length > 0, { timeoutMs: 2_000, what: 'the writer to see its socket close' })
  assert.equal(writer.closes[0].code, 1012, `close code seen by a connected client on shutdown: ${JSON.stringify(writer.closes)}`)
  clients.destroyAll()

  const second = await startTandem({ dataDir })
  servers.push(second)
  assert.notEqual(second.port, 0)
  const reader = clients.connect(second, room)
  await waitSynced(reader.provider)
  await waitFor(() => contents(reader.doc).map.n === 42, {
    timeoutMs: 5_000, what: 'the restarted server to serve the stored document', describe: () => JSON.stringify(contents(reader.doc))
  })
  assert.deepEqual(contents(reader.doc), expected())
  assert.equal((await second.stop()).code, 0)
})

test('content written a second before a crash (SIGKILL) survives', { timeout: 60_000 }, async (t) => {
  // The store writer commits in small groups within milliseconds (DESIGN.md): one second later the
  // edits must be on disk even if the process never gets to shut down.
  const dataDir = await withDataDir(t)
  const clients = new Clients()
  const servers = []
  t.after(async () => {
    clients.destroyAll()
    for (const s of servers) await s.kill()
  })
  const room = uniqueRoom('crash')

  const first = await startTandem({ dataDir })
  servers.push(first)
  const writer = clients.connect(first, room)
  await waitSynced(writer.provider)
  write(writer.doc)
  await sleep(1_000)
  await first.kill()
  clients.destroyAll()

  const second = await startTandem({ dataDir })
  servers.push(second)
  const reader = clients.connect(second, room)
  await waitSynced(reader.provider)
  await waitFor(() => contents(reader.doc).map.n === 42, {
    timeoutMs: 5_000, what: 'the restarted server to serve the stored document', describe: () => JSON.stringify(contents(reader.doc))
  })
  assert.deepEqual(contents(reader.doc), expected())
})
