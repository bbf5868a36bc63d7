// Tokens with stock y-websocket providers: the token travels in `params` (the query string), a
// valid one joins, a missing or wrong one is refused with tandem's close codes, and the v3
// provider stops reconnecting after them (4400-4499 are terminal for it).

import assert from 'node:assert/strict'
import { createHmac } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { startTandem } from '../lib/server.js'
import { Clients, uniqueRoom, waitFor, waitSynced } from '../lib/clients.js'

const SECRET = 'interop-secret-that-is-long-enough-0123456789'

const b64url = (s) => Buffer.from(s).toString('base64url')

/** An HS256 JWT for `rooms`, valid for an hour, signed with `secret`. */
function token (rooms, { secret = SECRET, exp = Math.floor(Date.now() / 1000) + 3600 } = {}) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const payload = b64url(JSON.stringify({ sub: 'interop', rooms, exp }))
  const signature = createHmac('sha256', secret).update(`${header}.${payload}`).digest('base64url')
  return `${header}.${payload}.${signature}`
}

/** Resolves with the provider's terminal close ({code, reason}). */
function terminalClose (provider, { timeoutMs = 10_000 } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no terminal close')), timeoutMs)
    provider.once('closed', (event) => { clearTimeout(timer); resolve(event) })
  })
}

describe('y-websocket v3 with tokens', { timeout: 60_000 }, () => {
  let server
  const clients = new Clients()
  before(async () => { server = await startTandem({ args: ['--jwt-secret', SECRET] }) })
  after(async () => {
    clients.destroyAll()
    await server?.stop()
  })

  test('a token in params joins and edits', async () => {
    const room = uniqueRoom('auth')
    const params = { token: token({ [room]: 'rw' }) }
    const a = clients.connect(server, room, { params })
    const b = clients.connect(server, room, { params })
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])
    a.doc.getText('t').insert(0, 'with a token')
    await waitFor(() => b.doc.getText('t').toString() === 'with a token', { what: 'the edit at b' })
    assert.deepEqual(a.closes, [])
  })

  test('no token is refused with 4401 and the provider stops', async () => {
    const room = uniqueRoom('auth')
    const c = clients.connect(server, room)
    const closed = await terminalClose(c.provider)
    assert.equal(closed.code, 4401)
    assert.match(closed.reason, /token is required/)
    assert.equal(c.provider.synced, false)
  })

  test('a token signed with another secret is refused with 4401', async () => {
    const room = uniqueRoom('auth')
    const c = clients.connect(server, room, { params: { token: token({ [room]: 'rw' }, { secret: 'x'.repeat(40) }) } })
    const closed = await terminalClose(c.provider)
    assert.equal(closed.code, 4401)
    assert.match(closed.reason, /bad signature/)
  })

  test('a token for another room is refused with 4403', async () => {
    const room = uniqueRoom('auth')
    const c = clients.connect(server, room, { params: { token: token({ 'elsewhere/*': 'rw' }) } })
    const closed = await terminalClose(c.provider)
    assert.equal(closed.code, 4403)
  })

  test('a read-only provider syncs but its edits go nowhere', async () => {
    const room = uniqueRoom('auth')
    const writer = clients.connect(server, room, { params: { token: token({ [room]: 'rw' }) } })
    const reader = clients.connect(server, room, { params: { token: token({ [room]: 'r' }) } })
    await Promise.all([waitSynced(writer.provider), waitSynced(reader.provider)])
    writer.doc.getText('t').insert(0, 'base')
    await waitFor(() => reader.doc.getText('t').toString() === 'base', { what: 'base at the reader' })
    reader.doc.getText('t').insert(0, 'evil ')
    // Give the reader's edit time to reach the server; had it been applied, the marker below
    // would land after it and the late joiner would see it.
    await new Promise((resolve) => setTimeout(resolve, 100))
    writer.doc.getText('t').insert(4, '!')
    await waitFor(() => reader.doc.getText('t').toString().endsWith('base!'), { what: 'the marker at the reader' })
    const late = clients.connect(server, room, { params: { token: token({ [room]: 'r' }) } })
    await waitSynced(late.provider)
    assert.equal(late.doc.getText('t').toString(), 'base!')
    assert.equal(writer.doc.getText('t').toString(), 'base!')
  })
})
