--- A small event emitter (luvit's core.lua Emitter, Node's EventEmitter).
-- Listeners run in the order they were added; adding or removing a listener
-- while an event is being emitted affects only later emits.
-- @module cluster.emitter
local errors = require "cluster.errors"

local Emitter = {}
Emitter.__index = Emitter

local select, type, error = select, type, error

--- Creates an emitter, or turns `obj` into one.
-- @tparam[opt] table obj
-- @treturn table
function Emitter.new(obj)
  return setmetatable(obj or {}, Emitter)
end

--- Mixes the emitter methods into a class table (for classes with their own metatable).
-- @tparam table class
function Emitter.mixin(class)
  for k, v in pairs(Emitter) do
    if k ~= "new" and k ~= "mixin" and k ~= "__index" and class[k] == nil then class[k] = v end
  end
  return class
end

-- self._listeners[name] holds the event's one listener (a function) or, for more, an
-- array that is itself callable (calling it calls each listener in turn): most
-- emitters (a socket's 'data', 'error') have a single listener per event, which then
-- costs no array, and emit() calls either without looking at which it is. Before the
-- first listener, self._listeners is nil or false (an object may reserve the field).
local List = {}
List.__index = List
List.__call = function(list, ...)
  -- on() appends to the same array, so iterate over a snapshot of its length;
  -- off() replaces the array, so the loop keeps the old one.
  local n = #list
  for i = 1, n do list[i](...) end
end

local function is_list(cur) return getmetatable(cur) == List end

-- `optional`: the listener may be nil (off)
local function check(fname, name, fn, optional)
  if type(name) ~= "string" then
    errors.raise(fname .. ": bad argument #1 (event name): expected a string, got " .. type(name))
  end
  if type(fn) ~= "function" and not (optional and fn == nil) then
    errors.raise(fname .. ": bad argument #2 (listener): expected a function, got " .. type(fn))
  end
end

--- Adds a listener. @treturn self
function Emitter:on(name, fn)
  if type(name) ~= "string" or type(fn) ~= "function" then check("on", name, fn) end
  local all = self._listeners
  if not all then
    -- room for four events from the start (the nil entries only size the table): a
    -- socket's second event ('error' after 'data') would otherwise rehash it
    self._listeners = { [name] = fn, _2 = nil, _3 = nil, _4 = nil }
  else
    local cur = all[name]
    if not cur then
      all[name] = fn
    elseif is_list(cur) then
      -- appended in place: an emit in progress iterates only the length it started with
      cur[#cur + 1] = fn
    else
      all[name] = setmetatable({ cur, fn }, List)
    end
  end
  local hook = self._onNewListener -- the object's own or its class's (a socket's)
  if hook then hook(self, name, fn) end
  return self
end
Emitter.addListener = Emitter.on

-- once() wrappers -> the listener they wrap, so that off(name, fn) finds them
local wrapped = setmetatable({}, { __mode = "k" })

--- Adds a listener that runs once. @treturn self
function Emitter:once(name, fn)
  check("once", name, fn)
  local wrapper
  local fired = false
  wrapper = function(...)
    -- (an emit that began before a nested one fired it still holds it: not again)
    if fired then return end
    fired = true
    self:off(name, wrapper)
    return fn(...)
  end
  wrapped[wrapper] = fn
  return Emitter.on(self, name, wrapper)
end

--- Removes a listener: of one added more than once, the one added last, as in Node
-- (with no function, all listeners of that event). @treturn self
function Emitter:off(name, fn)
  if type(name) ~= "string" or (fn ~= nil and type(fn) ~= "function") then check("off", name, fn, true) end
  local all = self._listeners
  local cur = all and all[name]
  if not cur then return self end
  if fn == nil then
    all[name] = nil
  elseif not is_list(cur) then
    if cur ~= fn and wrapped[cur] ~= fn then return self end
    all[name] = nil
  else
    local at = nil
    for i = #cur, 1, -1 do
      local l = cur[i]
      if l == fn or wrapped[l] == fn then at = i break end
    end
    if not at then return self end
    -- copy-on-write: an emit in progress keeps iterating the old array
    local kept = {}
    for i = 1, #cur do
      if i ~= at then kept[#kept + 1] = cur[i] end
    end
    all[name] = #kept > 1 and setmetatable(kept, List) or kept[1]
  end
  local hook = self._onRemoveListener
  if hook then hook(self, name) end
  return self
end
Emitter.removeListener = Emitter.off

--- Removes every listener of `name`, or with no name every listener of every event
-- (each event's removal is seen as off() shows it). @treturn self
function Emitter:removeAllListeners(name)
  if name ~= nil then
    if type(name) ~= "string" then check("removeAllListeners", name, nil, true) end
    return self:off(name)
  end
  local all = self._listeners
  if not all then return self end
  self._listeners = false
  local hook = self._onRemoveListener
  if hook then
    for event in pairs(all) do hook(self, event) end
  end
  return self
end

--- Number of listeners for an event.
function Emitter:listenerCount(name)
  local all = self._listeners
  local cur = all and all[name]
  if not cur then return 0 end
  return is_list(cur) and #cur or 1
end

--- The listeners of an event, in the order they run (a new array; a once() listener
-- appears as the function given to once, as in Node). @treturn table
function Emitter:listeners(name)
  local all = self._listeners
  local cur = all and all[name]
  if not cur then return {} end
  local list = is_list(cur) and cur or { cur }
  local copy = {}
  for i = 1, #list do copy[i] = wrapped[list[i]] or list[i] end
  return copy
end

-- 'error' with no listener raises its argument, as Node throws (unless the emitter has
-- an `_onUnheardError(emitter, err)` to take such errors; see errors.emit).
local function unheard_error(self, err, ...)
  local unheard = self._onUnheardError
  if unheard then unheard(self, err, ...) return false end
  if err == nil then err = errors.new("ERR_UNHANDLED_ERROR", nil, "Unhandled error.") end
  error(err, 0)
end

--- Calls every listener of `name` with the arguments. Returns true if there was any.
-- An 'error' nobody listens for raises its argument (Node's rule).
function Emitter:emit(name, ...)
  local all = self._listeners
  local cur = all and all[name]
  if not cur then
    if name == "error" then return unheard_error(self, ...) end
    return false
  end
  cur(...)
  return true
end

return Emitter
