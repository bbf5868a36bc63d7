// Hocuspocus (@hocuspocus/server, no extensions: no persistence, no auth hooks) on 127.0.0.1 and
// PORT (env or first argument; 0 = any free port). Its own `Server` passes the address to
// http.listen as `address`, which Node ignores (it would bind every interface), so the core
// `Hocuspocus` is wired to a plain http + ws server here, as `Server` does it. Prints
// `listening on 127.0.0.1:PORT`.
import http from 'node:http'
import { WebSocketServer } from 'ws'
import { Hocuspocus } from '@hocuspocus/server'

const port = Number(process.argv[2] ?? process.env.PORT ?? 0)
const hocuspocus = new Hocuspocus({ quiet: true })
const wss = new WebSocketServer({ noServer: true })
const server = http.createServer((_req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain' })
  res.end('Welcome to Hocuspocus!')
})
wss.on('connection', (ws, request) => {
  ws.on('error', e => console.error('websocket error:', e))
  hocuspocus.handleConnection(ws, request)
})
server.on('upgrade', (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, ws => wss.emit('connection', ws, request))
})
server.listen(port, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`)
})
const stop = () => server.close(() => process.exit(0)) && setTimeout(() => process.exit(0), 500)
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
