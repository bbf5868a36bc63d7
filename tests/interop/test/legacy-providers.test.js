// Older y-websocket providers (npm aliases y-websocket-v1 and y-websocket-v2) against tandem,
// side by side with the current (v3) provider.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { startTandem } from '../lib/server.js'
import {
  Clients, WebsocketProvider, WebsocketProviderV1, WebsocketProviderV2,
  sleep, uniqueRoom, waitConverged, waitFor, waitSynced
} from '../lib/clients.js'

const legacy = [['v1', WebsocketProviderV1], ['v2', WebsocketProviderV2]]

describe('older y-websocket providers', { timeout: 90_000 }, () => {
  let server
  const clients = new Clients()
  before(async () => { server = await startTandem() })
  after(async () => {
    clients.destroyAll()
    if (server) await server.stop()
  })

  for (const [version, Provider] of legacy) {
    const skip = Provider ? false : `y-websocket-${version} is not installed`
    test(`a ${version} and a v3 provider edit concurrently, converge and see each other's presence`, { timeout: 30_000, skip }, async () => {
      const room = uniqueRoom(version)
      const old = clients.connect(server, room, { Provider })
      const cur = clients.connect(server, room, { Provider: WebsocketProvider })
      old.provider.awareness.setLocalStateField('user', { name: version })
      cur.provider.awareness.setLocalStateField('user', { name: 'v3' })
      await Promise.all([waitSynced(old.provider), waitSynced(cur.provider)])

      const chunks = []
      for (let r = 0; r < 20; r++) {
        for (const [name, c] of [[version, old], ['v3', cur]]) {
          const text = c.doc.getText('text')
          const chunk = `[${name}:${r}]`
          chunks.push(chunk)
          text.insert(r % 2 ? 0 : text.length, chunk)
          c.doc.getMap('map').set(name, r)
        }
        await sleep(r % 3)
      }
      const result = await waitConverged([old.doc, cur.doc])
      assert.deepEqual(chunks.filter((c) => !result.text.includes(c)), [])
      assert.deepEqual(result.map, { [version]: 19, v3: 19 })

      const nameAt = (observer, subject) =>
        observer.provider.awareness.getStates().get(subject.doc.clientID)?.user?.name
      await waitFor(() => nameAt(old, cur) === 'v3', { what: `${version} to see v3's presence` })
      await waitFor(() => nameAt(cur, old) === version, { what: `v3 to see ${version}'s presence` })
    })
  }
})
