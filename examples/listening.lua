-- Seed: Event 'listening', on the cluster and on one worker:
--   v0.6: cluster.on('listening', function(worker) { console.log("We are now connected") });
--   v4:   cluster.on('listening', function(worker, address) {
--           console.log("A worker is now connected to " + address.address + ":" + address.port) });
--   both: cluster.fork().on('listening', function(address) { /* Worker is listening */ });
-- `address` also has addressType: 4 (TCPv4), 6 (TCPv6), -1 (unix socket), "udp4"/"udp6".
-- Worker 1 listens on TCPv4, worker 2 on a unix socket and a UDP socket; once every
-- listen is reported the master disconnects them and the run ends.
local cluster = require "cluster"
local net = require "cluster.net"
local dgram = require "cluster.dgram"

if cluster.isMaster then
  local expected, seen = 4, {}
  cluster.on("listening", function(worker, address)
    print("We are now connected")
    local where = address.port and (address.address .. ":" .. address.port) or address.address -- (a path)
    print("A worker is now connected to " .. where
      .. " (addressType " .. tostring(address.addressType) .. ", worker " .. worker.id .. ")")
    seen[#seen + 1] = address.addressType
    if #seen == expected then cluster.disconnect() end
  end)
  for id = 1, 2 do
    local worker = cluster.fork({ LISTEN_AS = tostring(id) })
    worker:on("listening", function(address)
      print("Worker " .. worker.id .. " is listening (its own listener runs first)")
    end)
  end
  cluster.run()
  table.sort(seen, function(a, b) return tostring(a) < tostring(b) end)
  assert(table.concat(seen, ",") == "-1,4,4,udp4", table.concat(seen, ","))
else
  if os.getenv("LISTEN_AS") == "1" then
    net.createServer(function(socket) socket:destroy() end):listen(0, "127.0.0.1")
    net.createServer(function(socket) socket:destroy() end):listen(0, "127.0.0.1")
  else
    local path = os.tmpname()
    os.remove(path)
    net.createServer(function(socket) socket:destroy() end):listen(path)
    dgram.createSocket("udp4"):bind(0, "127.0.0.1")
  end
  cluster.run()
end
