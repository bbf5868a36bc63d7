// Presence (y-protocols awareness) through tandem with stock y-websocket (v3) providers.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { startTandem } from '../lib/server.js'
import { Clients, uniqueRoom, waitFor, waitSynced } from '../lib/clients.js'

const userOf = (observer, subject) => observer.provider.awareness.getStates().get(subject.doc.clientID)?.user
const statesOf = (c) => JSON.stringify(Object.fromEntries(c.provider.awareness.getStates()))

describe('y-websocket v3 awareness', { timeout: 90_000 }, () => {
  let server
  const clients = new Clients()
  before(async () => { server = await startTandem() })
  after(async () => {
    clients.destroyAll()
    if (server) await server.stop()
  })

  test('a joiner sees existing states, and the others see the joiner', { timeout: 20_000 }, async () => {
    const room = uniqueRoom('aw-join')
    const a = clients.connect(server, room)
    a.provider.awareness.setLocalStateField('user', { name: 'a' })
    await waitSynced(a.provider)

    // b joins after a's state was sent: tandem must hand b the states it already knows.
    const b = clients.connect(server, room)
    b.provider.awareness.setLocalStateField('user', { name: 'b' })
    await waitSynced(b.provider)
    await waitFor(() => userOf(b, a)?.name === 'a', { what: "b to see a's state", describe: () => statesOf(b) })
    await waitFor(() => userOf(a, b)?.name === 'b', { what: "a to see b's state", describe: () => statesOf(a) })

    // Changes are relayed too.
    a.provider.awareness.setLocalStateField('user', { name: 'a2' })
    await waitFor(() => userOf(b, a)?.name === 'a2', { what: "b to see a's new state", describe: () => statesOf(b) })
  })

  test('a provider that is destroyed disappears from the others within seconds', { timeout: 20_000 }, async () => {
    const room = uniqueRoom('aw-leave')
    const a = clients.connect(server, room)
    const b = clients.connect(server, room)
    a.provider.awareness.setLocalStateField('user', { name: 'a' })
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])
    await waitFor(() => userOf(b, a)?.name === 'a', { what: "b to see a's state", describe: () => statesOf(b) })

    a.provider.destroy()
    await waitFor(() => !b.provider.awareness.getStates().has(a.doc.clientID), {
      timeoutMs: 5_000, what: "a's state to be removed at b", describe: () => statesOf(b)
    })
  })

  test('a connection that drops without saying goodbye is removed by the server within seconds', { timeout: 20_000 }, async () => {
    // The provider normally sends a null state on disconnect; here the TCP connection just dies, so
    // only tandem (which must broadcast null states for the clients of a closed connection) can
    // tell b. b's own 30 s timeout is far beyond the deadline.
    const room = uniqueRoom('aw-drop')
    const a = clients.connect(server, room)
    const b = clients.connect(server, room)
    a.provider.awareness.setLocalStateField('user', { name: 'a' })
    await Promise.all([waitSynced(a.provider), waitSynced(b.provider)])
    await waitFor(() => userOf(b, a)?.name === 'a', { what: "b to see a's state", describe: () => statesOf(b) })

    a.provider.shouldConnect = false // no reconnect
    a.provider.ws.terminate() // `ws`: destroy the socket, no close frame, no awareness goodbye
    await waitFor(() => !b.provider.awareness.getStates().has(a.doc.clientID), {
      timeoutMs: 5_000, what: "a's state to be removed at b after a's socket died", describe: () => statesOf(b)
    })
  })
})
