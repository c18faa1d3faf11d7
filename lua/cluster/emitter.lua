--- A small event emitter (luvit's core.lua Emitter, Node's EventEmitter).
-- Listeners run in the order they were added; adding or removing a listener
-- while an event is being emitted affects only later emits.
-- @module cluster.emitter
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

local function check(self, fname, name, fn)
  if type(name) ~= "string" then
    error(fname .. ": bad argument #1 (event name): expected a string, got " .. type(name), 3)
  end
  if type(fn) ~= "function" then
    error(fname .. ": bad argument #2 (listener): expected a function, got " .. type(fn), 3)
  end
  local all = rawget(self, "_listeners")
  if not all then
    all = {}
    rawset(self, "_listeners", all)
  end
  local list = all[name]
  if not list then
    list = {}
    all[name] = list
  end
  return list
end

local function notify_new(self, name)
  local hook = rawget(self, "_onNewListener")
  if hook then hook(self, name) end
end

--- Adds a listener. @treturn self
function Emitter:on(name, fn)
  local list = check(self, "on", name, fn)
  list[#list + 1] = fn
  notify_new(self, name)
  return self
end
Emitter.addListener = Emitter.on

-- once() wrappers -> the listener they wrap, so that off(name, fn) finds them
local wrapped = setmetatable({}, { __mode = "k" })

--- Adds a listener that runs once. @treturn self
function Emitter:once(name, fn)
  local list = check(self, "once", name, fn)
  local wrapper
  wrapper = function(...)
    self:off(name, wrapper)
    return fn(...)
  end
  wrapped[wrapper] = fn
  list[#list + 1] = wrapper
  notify_new(self, name)
  return self
end

--- Removes a listener (or, with no function, all listeners of that event). @treturn self
function Emitter:off(name, fn)
  local all = rawget(self, "_listeners")
  local list = all and all[name]
  if not list then return self end
  if fn == nil then
    all[name] = nil
  else
    -- copy-on-write: an emit in progress keeps iterating the old list
    local kept = {}
    local removed = false
    for i = 1, #list do
      local l = list[i]
      if not removed and (l == fn or wrapped[l] == fn) then removed = true else kept[#kept + 1] = l end
    end
    all[name] = #kept > 0 and kept or nil
  end
  local hook = rawget(self, "_onRemoveListener")
  if hook then hook(self, name) end
  return self
end
Emitter.removeListener = Emitter.off

function Emitter:removeAllListeners(name)
  if name == nil then rawset(self, "_listeners", nil) return self end
  return self:off(name)
end

--- Number of listeners for an event.
function Emitter:listenerCount(name)
  local all = rawget(self, "_listeners")
  local list = all and all[name]
  return list and #list or 0
end

--- Calls every listener of `name` with the arguments. Returns true if there was any.
function Emitter:emit(name, ...)
  local all = rawget(self, "_listeners")
  local list = all and all[name]
  if not list then return false end
  if #list == 1 then
    list[1](...)
    return true
  end
  -- on() appends to the same array, so iterate over a snapshot of its length;
  -- off() replaces the array, so the loop keeps the old one.
  local n = #list
  for i = 1, n do list[i](...) end
  return true
end

return Emitter
