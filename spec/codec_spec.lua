-- The message codec (csrc/codec.c) through core.encode / core.decode.
local core = require "cluster.core"

local encode, decode = core.encode, core.decode

-- Deep equality that tells integers from floats, compares floats bit for bit (so NaN
-- equals itself and -0.0 differs from 0.0) and requires the same set of keys.
local function same(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return false end
  if ta == "number" then
    if math.type(a) ~= math.type(b) then return false end
    if math.type(a) == "float" then return string.pack("<d", a) == string.pack("<d", b) end
    return a == b
  end
  if ta ~= "table" then return a == b end
  local n = 0
  for k, v in pairs(a) do
    n = n + 1
    local w = rawget(b, k)
    if w == nil or not same(v, w) then return false end
  end
  for _ in pairs(b) do n = n - 1 end
  return n == 0
end

local function show(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v) .. " (" .. (math.type(v) or type(v)) .. ")"
end

local function roundtrip(v)
  local s = encode(v)
  assert.is_string(s)
  local n = select("#", decode(s))
  local w, err = decode(s)
  assert(n == 1, "decode failed: " .. tostring(err))
  assert(same(v, w), "round trip changed " .. show(v) .. " into " .. show(w))
  return w, s
end

-- Asserts that decode(s) returns exactly nil and an error message.
local function rejected(s)
  local ok, v, err = pcall(decode, s)
  assert(ok, "decode raised: " .. tostring(v))
  assert(v == nil and type(err) == "string",
    "expected nil, err for " .. show(s) .. ", got " .. show(v))
  return err
end

local function nest(depth, leaf)
  local t = leaf
  for _ = 1, depth do t = { t } end
  return t
end

local function bytes(n)
  local parts = {}
  for i = 1, (n + 7) // 8 do parts[i] = string.pack("<i8", math.random(0)) end
  return table.concat(parts):sub(1, n)
end

-- A seeded generator of nested values the codec must carry unchanged.
local INTS = { 0, 1, -1, 31, 32, 127, 128, -32, -33, -128, -129, 255, 256, 32767, 32768,
  -32768, -32769, 65535, 65536, 2147483647, 2147483648, -2147483648, -2147483649,
  math.maxinteger, math.mininteger, math.maxinteger - 1, math.mininteger + 1 }
local FLOATS = { 0.0, -0.0, 1.0, -1.0, 0.5, -1.5, 1 / 0, -1 / 0, 0 / 0, -(0 / 0), math.pi,
  1e300, -1e300, 5e-324, 2.0 ^ 63, -2.0 ^ 63, 3.4028234663852886e38, 3.4028235677973366e38,
  1.401298464324817e-45, 1e-46, 0.1, 2.0 ^ 53 + 2, 123456789.0 }

local function rand_int()
  local r = math.random()
  if r < 0.3 then return INTS[math.random(#INTS)] end
  if r < 0.6 then return math.random(-200, 200) end
  if r < 0.8 then return math.random(-70000, 70000) end
  return math.random(0)
end

local function rand_float()
  local r = math.random()
  if r < 0.3 then return FLOATS[math.random(#FLOATS)] end
  if r < 0.5 then return math.random(-1000, 1000) / 4 + 0.0 end
  if r < 0.7 then return (math.random() - 0.5) * 10.0 ^ math.random(-30, 30) end
  return (string.unpack("<d", bytes(8))) -- any bit pattern: NaN payloads, subnormals
end

local small_strings = false -- fuzz tests keep encodings short

local function rand_string()
  local r = math.random()
  if small_strings then return bytes(math.random(0, 40)) end
  if r < 0.1 then return "" end
  if r < 0.7 then return bytes(math.random(1, 31)) end
  if r < 0.995 then return bytes(math.random(32, 300)) end
  return bytes(math.random(301, 70000))
end

local function rand_key()
  local r = math.random()
  if r < 0.5 then return rand_string() end
  if r < 0.8 then return rand_int() end
  if r < 0.95 then
    local f = rand_float()
    if f ~= f then f = 0.25 end -- NaN cannot be a key
    return f
  end
  return math.random() < 0.5
end

local rand_value
local function rand_table(depth)
  local t = {}
  local shape = math.random()
  local size = math.random() < 0.05 and 40 or 6 -- now and then past the 15-entry headers
  if shape < 0.4 or depth <= 0 then
    for i = 1, math.random(0, size) do t[i] = rand_value(depth - 1) end
  end
  if shape > 0.3 then
    for _ = 1, math.random(0, size) do
      local v = rand_value(depth - 1)
      if v ~= nil then t[rand_key()] = v end
    end
  end
  if shape > 0.9 then t[math.random(1, 1000)] = true end -- sparse
  return t
end

function rand_value(depth)
  local r = math.random()
  if r < 0.05 then return nil end
  if r < 0.15 then return math.random() < 0.5 end
  if r < 0.35 then return rand_int() end
  if r < 0.5 then return rand_float() end
  if r < 0.7 or depth <= 0 then return rand_string() end
  return rand_table(depth)
end

local function flip_bytes(s, nflips)
  local b = { s:byte(1, -1) }
  for _ = 1, nflips do
    if #b == 0 then break end
    local i = math.random(#b)
    local r = math.random()
    if r < 0.7 then
      b[i] = math.random(0, 255)
    elseif r < 0.85 then
      table.remove(b, i)
    else
      table.insert(b, i, math.random(0, 255))
    end
  end
  local parts = {}
  for i = 1, #b, 4096 do parts[#parts + 1] = string.char(table.unpack(b, i, math.min(i + 4095, #b))) end
  return table.concat(parts)
end

describe("codec", function()
  before_each(function()
    math.randomseed(20240607)
    small_strings = false
  end)

  describe("tables per message", function()
    local function many(n, make)
      local t = {}
      for i = 1, n do t[i] = make() end
      return t
    end

    it("takes lists of small records, however small each record's encoding", function()
      roundtrip(many(20000, function() return { 1, 2 } end)) -- 3 bytes a table
      roundtrip(many(20000, function() return {} end))       -- 1 byte a table
    end)

    it("refuses a table reached by more than 2^20 paths at once, counting as it goes (t = {t, t} forty times over)", function()
      local t = {}
      for _ = 1, 40 do t = { t, t } end
      local ok, err = pcall(encode, t)
      assert.is_false(ok)
      assert.matches("more than a receiver takes", err)
    end)

    it("refuses, on both sides, more than 2^20 tables: a peer cannot make its receiver build a flood of them", function()
      local n = 2 ^ 20 + 1
      local ok, err = pcall(encode, many(n, function() return {} end))
      assert.is_false(ok)
      assert.matches("more than a receiver takes", err)
      -- the same bytes built by hand: an array (0xcd, counts 2^20 + 1 and 0) of empty arrays (0xb0)
      local v, msg = decode("\205\129\128\064\000" .. string.rep("\176", n))
      assert.is_nil(v)
      assert.matches("more tables than a message may hold", msg)
      collectgarbage()
    end)
  end)

  describe("scalars", function()
    it("round-trips nil, false and true", function()
      for _, v in ipairs({ false, true }) do assert.equal(v, roundtrip(v)) end
      local s = encode(nil)
      assert.equal(1, select("#", decode(s)))
      assert.is_nil(decode(s))
    end)

    it("keeps integers integers at every width boundary", function()
      for _, v in ipairs(INTS) do
        local w = roundtrip(v)
        assert.equal("integer", math.type(w))
        assert.equal(v, w)
      end
    end)

    it("keeps floats floats, including integral ones", function()
      for _, v in ipairs({ 1.0, 0.0, -3.0, 2.0 ^ 63, 1e15 }) do
        assert.equal("float", math.type(roundtrip(v)))
      end
      assert.equal("integer", math.type(roundtrip(1)))
    end)

    it("round-trips NaN, inf, -inf and -0.0 bit for bit", function()
      for _, v in ipairs(FLOATS) do roundtrip(v) end
      local z = roundtrip(-0.0)
      assert.equal(-1 / 0, 1 / z)
      local nan = roundtrip(0 / 0)
      assert.is_true(nan ~= nan)
    end)

    it("round-trips random float bit patterns", function()
      for _ = 1, 2000 do roundtrip(rand_float()) end
    end)

    it("encodes small integers, short strings and small tables compactly", function()
      assert.equal("\x01", encode(1))
      assert.equal("\x7f", encode(127))
      assert.equal("\xff", encode(-1))
      assert.equal("\xe0", encode(-32))
      assert.equal(3, #encode(300))
      assert.equal("\x83abc", encode("abc"))
      assert.equal(2 + 40, #encode(string.rep("x", 40)))
      assert.equal("\xc0", encode(nil))
      assert.equal("\xc1", encode(false))
      assert.equal("\xc2", encode(true))
      assert.equal("\xb3\x01\x02\x03", encode({ 1, 2, 3 }))
      assert.equal("\xa0", encode({}))
      assert.equal(10, #encode({ cmd = "x", n = 1 }))
      assert.equal(5, #encode(1.5))
      assert.equal(9, #encode(0.1))
    end)
  end)

  describe("strings", function()
    it("carries all 256 byte values, embedded zeros included", function()
      local t = {}
      for i = 0, 255 do t[#t + 1] = string.char(i) end
      local s = table.concat(t)
      assert.equal(s, roundtrip(s))
      assert.equal("\0\0a\0", roundtrip("\0\0a\0"))
      for i = 0, 255 do assert.equal(string.char(i), roundtrip(string.char(i))) end
    end)

    it("carries strings across every length header (0, 31, 32, 255, 256, 65535, 65536)", function()
      for _, n in ipairs({ 0, 1, 31, 32, 255, 256, 65535, 65536, 70000 }) do
        local s = bytes(n)
        local w, enc = roundtrip(s)
        assert.equal(n, #w)
        assert.is_true(#enc <= n + 5)
      end
    end)

    it("carries a 1 MiB string", function()
      local s = bytes(1024 * 1024)
      assert.equal(s, roundtrip(s))
      assert.equal(s, roundtrip({ data = s, n = 1 }).data)
    end)
  end)

  describe("tables", function()
    it("round-trips nested tables", function()
      roundtrip({ a = { b = { c = { 1, 2, { d = "e" } } } }, x = {} })
    end)

    it("round-trips mixed array and hash parts", function()
      roundtrip({ 1, 2, 3, "four", n = 4, [10] = 10, [-1] = -1, [0] = 0 })
      roundtrip({ "a", { "b" }, k = { "c", z = true } })
    end)

    it("round-trips sparse arrays without filling the holes", function()
      roundtrip({ 1, nil, 3 })
      roundtrip({ nil, nil, 3 })
      local t = { 1, 2, 3 }
      t[2] = nil
      roundtrip(t)
      local big = { [1] = "a", [1000000] = "b" }
      local _, s = roundtrip(big)
      assert.is_true(#s < 32)
      local holes = {}
      for i = 1, 1000 do holes[i] = i end
      for i = 2, 1000, 2 do holes[i] = nil end
      roundtrip(holes)
    end)

    it("round-trips float, boolean, negative and zero keys", function()
      local w = roundtrip({ [1.5] = "f", [-0.25] = "g", [1 / 0] = "inf", [true] = "t", [false] = "f",
        [0] = "zero", [-5] = "neg", [math.maxinteger] = "max", [math.mininteger] = "min" })
      assert.equal("f", w[1.5])
      assert.equal("t", w[true])
      assert.equal("inf", w[1 / 0])
    end)

    it("round-trips table keys", function()
      local s = encode({ [{ 1, 2 }] = "pair", plain = 1 })
      local w = decode(s)
      assert.equal(1, w.plain)
      local found
      for k, v in pairs(w) do
        if type(k) == "table" then
          assert.is_true(same(k, { 1, 2 }))
          found = v
        end
      end
      assert.equal("pair", found)
    end)

    it("round-trips large arrays, maps and mixed tables", function()
      local arr, map, mixed = {}, {}, {}
      for i = 1, 5000 do
        arr[i] = i * 3
        map["k" .. i] = i + 0.5
        mixed[i] = tostring(i)
        mixed["m" .. i] = i
      end
      roundtrip(arr)
      roundtrip(map)
      roundtrip(mixed)
      for n = 14, 18 do -- around the one-byte table header limit
        local a, m, x = {}, {}, {}
        for i = 1, n do
          a[i] = i
          m["k" .. i] = i
          x[i] = i
          x["k" .. i] = i
        end
        roundtrip(a)
        roundtrip(m)
        roundtrip(x)
        roundtrip({ a, { m, { x } } })
      end
    end)

    it("round-trips large nested bodies (padded headers)", function()
      local chunk = bytes(3000)
      local t = { chunk, chunk, k = chunk }
      for _ = 1, 10 do
        local outer = { t, t }
        for i = 1, 20 do outer["f" .. i] = i end
        t = outer
      end
      roundtrip(t)
    end)

    it("encodes a table shared by siblings (a DAG) twice", function()
      local shared = { v = 1 }
      local w = roundtrip({ a = shared, b = shared, list = { shared, shared } })
      assert.is_true(same(w.a, w.b))
      assert.are_not.equal(w.a, w.b) -- two copies after the trip
    end)

    it("ignores metatables and encodes raw contents", function()
      local t = setmetatable({ a = 1 }, { __index = function() return "meta" end, __len = function() return 99 end,
        __pairs = function() error("no pairs") end })
      local w = decode(encode(t))
      assert.is_true(same(w, { a = 1 }))
      assert.is_nil(getmetatable(w))
    end)

    it("accepts nesting exactly 200 deep on both sides", function()
      local w = roundtrip(nest(200, "leaf"))
      for _ = 1, 200 do w = w[1] end
      assert.equal("leaf", w)
      assert.is_not_nil(decode(string.rep("\xb1", 200) .. "\x01"))
    end)

    it("refuses to encode nesting deeper than 200", function()
      local ok, err = pcall(encode, nest(201, 1))
      assert.is_false(ok)
      assert.matches("^encode: value%[1%]", err)
      assert.matches("nesting deeper than 200", err)
      ok, err = pcall(encode, nest(1000, 1))
      assert.is_false(ok)
      assert.matches("nesting deeper than 200", err)
    end)

    it("refuses to decode nesting deeper than 200", function()
      assert.matches("deeper than 200", rejected(string.rep("\xb1", 201) .. "\x01"))
      assert.matches("deeper than 200", rejected(string.rep("\xb1", 100000) .. "\x01"))
      -- keys count as nesting too
      assert.matches("deeper than 200", rejected(string.rep("\xa1", 201) .. "\x01" .. string.rep("\x01", 201)))
    end)
  end)

  describe("refusals", function()
    local function refused(v)
      local ok, err = pcall(encode, v)
      assert.is_false(ok)
      assert.is_string(err)
      return err
    end

    it("names the path of a function", function()
      assert.equal("encode: value.handler is a function", refused({ handler = print }))
      assert.equal("encode: value is a function", refused(print))
      assert.equal("encode: value.a.b[2] is a function", refused({ a = { b = { 1, function() end } } }))
    end)

    it("names the path of a userdata", function()
      assert.equal("encode: value[3] is a userdata", refused({ 1, 2, io.stdout }))
    end)

    it("names the path of a thread, quoting odd keys", function()
      assert.equal('encode: value["a b"][2] is a thread', refused({ ["a b"] = { 1, coroutine.create(print) } }))
      assert.equal('encode: value["\\000\\"x"] is a thread', refused({ ['\0"x'] = coroutine.running() }))
      assert.equal("encode: value[1.5][true][-7] is a thread",
        refused({ [1.5] = { [true] = { [-7] = coroutine.running() } } }))
    end)

    it("quotes a key as a Lua string literal that reads back as the key (\\ddd with three digits: a byte before a digit stays apart from it)", function()
      assert.equal('encode: value["a\\0012b"] is a function', refused({ ["a\1" .. "2b"] = print }))
      for first = 0, 255, 40 do
        local bytes = {}
        for i = 0, 39 do bytes[#bytes + 1] = string.char((first + i) % 256) end
        local key = table.concat(bytes)
        local quoted = refused({ [key] = print }):match('^encode: value%[(".*")%] is a function$')
        assert.is_string(quoted)
        assert.equal(key, load("return " .. quoted)())
      end
    end)

    it("names the key type of a bad key", function()
      assert.equal("encode: value has a key of type function", refused({ [print] = 1 }))
      assert.equal("encode: value.inner has a key of type userdata", refused({ inner = { [io.stdout] = 1 } }))
      assert.equal("encode: value.inner has a key of type thread", refused({ inner = { [coroutine.running()] = 1 } }))
    end)

    it("refuses cycles, naming the path", function()
      local t = { a = { b = {} } }
      t.a.b.c = t.a
      assert.equal("encode: value.a.b.c is a cycle", refused(t))
      local self = {}
      self[1] = self
      assert.equal("encode: value[1] is a cycle", refused(self))
      local k = {}
      k[k] = 1
      assert.matches("is a cycle$", refused(k))
    end)

    it("cuts very long paths short", function()
      local t = { f = print }
      for _ = 1, 150 do t = { ["a rather long key name"] = t } end
      local err = refused(t)
      assert.matches("%.%.%.", err)
      assert.is_true(#err < 600)
    end)

    it("leaves the encoder usable after a refusal", function()
      for _ = 1, 100 do refused({ 1, { 2, { f = print } } }) end
      roundtrip({ 1, { 2, { f = "print" } } })
    end)
  end)

  describe("malformed input", function()
    it("rejects bad tags", function()
      for tag = 0xce, 0xdf do assert.matches("bad tag", rejected(string.char(tag))) end
    end)

    it("rejects the empty string", function()
      rejected("")
    end)

    it("rejects trailing bytes", function()
      assert.matches("trailing", rejected(encode(1) .. "\0"))
      assert.matches("trailing", rejected(encode({ a = 1 }) .. "x"))
      assert.matches("trailing", rejected("\xc0\xc0"))
    end)

    it("rejects nil and NaN keys", function()
      assert.matches("nil", rejected("\xa1\xc0\x01"))
      assert.matches("NaN", rejected("\xa1\xc8" .. string.pack("<d", 0 / 0) .. "\x01"))
    end)

    it("rejects counts and lengths beyond the input without allocating them", function()
      assert.matches("exceed", rejected("\xcd\xff\xff\xff\xff\x0f\x00"))
      assert.matches("exceed", rejected("\xcd\x00\xff\xff\xff\xff\xff\xff\xff\xff\x7f"))
      assert.matches("exceed", rejected("\xcd\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x00"))
      rejected("\xcd\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x00") -- varint overflow
      rejected("\xcd\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00") -- varint too long
      rejected("\xcc\xff\xff\xff\xff\xff\xff\xff\xff")
      rejected("\xcb\xff\xff\xff\xff")
      rejected("\xc9\x05abcd")
      -- each nested table claims nearly the whole input; together they cannot
      local claim = "\xcd\xe8\x07\x00" -- 1000 array values
      rejected(string.rep(claim, 150) .. string.rep("\x01", 1000))
    end)

    it("accepts padded varints in table headers", function()
      assert.is_true(same({ 7 }, decode("\xcd\x81\x80\x00\x80\x00\x07")))
    end)

    it("rejects every truncation of valid encodings", function()
      local samples = { { cmd = "x", n = 1 }, { 1, 2.5, "three", { four = 4 } }, math.mininteger, 0.1, 1.5,
        string.rep("s", 300), { [true] = false, [1.5] = { "x" } }, nest(20, { a = 1 }) }
      small_strings = true
      for _ = 1, 20 do samples[#samples + 1] = rand_table(3) end
      for _, v in ipairs(samples) do
        local s = encode(v)
        for i = 0, #s - 1 do rejected(s:sub(1, i)) end
      end
    end)

    it("survives random byte flips of valid encodings", function()
      small_strings = true
      for _ = 1, 3000 do
        local s = encode(rand_table(3))
        if #s > 0 then
          local m = flip_bytes(s, math.random(1, 4))
          local ok, v, err = pcall(decode, m)
          assert(ok, "decode raised: " .. tostring(v))
          if v == nil and err ~= nil then assert.is_string(err) end
        end
      end
    end)

    it("survives random byte strings", function()
      for _ = 1, 5000 do
        local s = bytes(math.random(0, 64))
        local ok, v, err = pcall(decode, s)
        assert(ok, "decode raised: " .. tostring(v))
        if v == nil and err ~= nil then assert.is_string(err) end
      end
      -- biased towards table and string tags, which exercise the length checks
      local tags = { "\xa3", "\xb4", "\xcd", "\xc9", "\xca", "\x85", "\xc3", "\xc6", "\xc8" }
      for _ = 1, 5000 do
        local parts = {}
        for i = 1, math.random(1, 12) do
          parts[i] = math.random() < 0.5 and tags[math.random(#tags)] or bytes(math.random(0, 3))
        end
        local ok, v = pcall(decode, table.concat(parts))
        assert(ok, "decode raised: " .. tostring(v))
      end
    end)

    it("returns exactly one value on success and two on failure", function()
      assert.equal(1, select("#", decode(encode({ 1 }))))
      assert.equal(1, select("#", decode(encode(nil))))
      assert.equal(2, select("#", decode("\xce")))
    end)

    it("raises only for a non-string argument", function()
      assert.has_error(function() decode({}) end)
    end)
  end)

  describe("random values", function()
    it("round-trips thousands of seeded random nested values", function()
      for i = 1, 3000 do
        local v = rand_value(4)
        local s = encode(v)
        local n = select("#", decode(s))
        local w = decode(s)
        assert(n == 1 and same(v, w), "value #" .. i .. " did not round-trip")
      end
    end)
  end)
end)
