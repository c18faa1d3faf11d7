--- A socket's idle timeout (Node's `socket.setTimeout`): `'timeout'` after `ms` without
-- activity. Internal to `cluster.net`.
--
-- Activity (bytes read, a write, the connection completing) only records the loop's
-- time; nothing is started or stopped per chunk. The timer runs out at most once per
-- `ms`: if there was activity since, it waits for what is left; a write queue that
-- shrank since the last look counts as activity too (a large write draining to a slow
-- reader is not idle). Otherwise it emits `'timeout'` once and rests until the next
-- activity (while writes wait in the queue, it keeps looking at it every `ms`, without
-- emitting again). The timer never keeps the loop alive (the socket does that).
-- @module cluster.idle_timeout
local core = require "cluster.core"
local Emitter = require "cluster.emitter"

local emit, now = Emitter.emit, core.now
local write_queue_size = core.stream_methods.write_queue_size

local M = {}

local function queued(self)
  local h = self._handle
  if not h or self.destroyed or self.connecting then return 0 end
  return write_queue_size(h)
end

local function expired(self)
  local ms = self._idleMs
  if not ms or self.destroyed then return end
  local timer = self._idleTimer
  local idle = now() - self._idleSince
  local q = queued(self)
  local progressed = q ~= self._idleQueued -- (to 0 too: the last step drained)
  self._idleQueued = q
  if progressed then
    self._idleResting = false
    self._idleSince = now()
    timer:start(ms, 0, self._idleExpired)
  elseif self._idleResting then
    timer:start(ms, 0, self._idleExpired) -- still stuck: watch on, no second 'timeout'
  elseif idle < ms then
    timer:start(ms - idle, 0, self._idleExpired)
  else
    self._idleResting = true
    -- a write stuck in the queue is watched on: its draining is activity, after which
    -- the socket can time out again (Node's timer restarts when a write completes)
    if q > 0 then timer:start(ms, 0, self._idleExpired) end
    emit(self, "timeout")
  end
end

--- Starts (or restarts) the idle timeout of `self` with `ms` > 0 milliseconds.
function M.start(self, ms)
  self._idleMs = ms
  self._idleSince = now()
  self._idleQueued = queued(self)
  self._idleResting = false
  local timer = self._idleTimer
  if not timer then
    timer = core.timer()
    timer:unref()
    self._idleTimer = timer
    self._idleExpired = function() expired(self) end
  end
  timer:start(ms, 0, self._idleExpired)
end

--- Activity on `self`, whose idle timeout is on.
function M.touch(self)
  self._idleSince = now()
  if self._idleResting then
    self._idleResting = false
    self._idleTimer:start(self._idleMs, 0, self._idleExpired)
  end
end

--- Turns the idle timeout off; with `closing`, lets its timer go too.
function M.stop(self, closing)
  self._idleMs = false
  local timer = self._idleTimer
  if not timer then return end
  if closing then
    self._idleTimer, self._idleExpired = nil, nil
    timer:close()
  else
    timer:stop()
  end
end

return M
