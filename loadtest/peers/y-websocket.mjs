// The stock y-websocket server (@y/websocket-server's setupWSConnection, as its bin/server.js
// wires it) on 127.0.0.1 and PORT (env or first argument; 0 = any free port). No persistence
// (YPERSISTENCE is cleared), no auth, no callback. Prints `listening on 127.0.0.1:PORT`.
import http from 'node:http'
import { WebSocketServer } from 'ws'

delete process.env.YPERSISTENCE
delete process.env.CALLBACK_URL
const { setupWSConnection } = await import('@y/websocket-server/utils')

const port = Number(process.argv[2] ?? process.env.PORT ?? 0)
const wss = new WebSocketServer({ noServer: true })
const server = http.createServer((_req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain' })
  res.end('okay')
})
wss.on('connection', setupWSConnection)
server.on('upgrade', (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, ws => wss.emit('connection', ws, request))
})
server.listen(port, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`)
})
const stop = () => server.close(() => process.exit(0)) && setTimeout(() => process.exit(0), 500)
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
