local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local extra = n * 6
local members, me, ttl = ARGV[extra + 1], ARGV[extra + 2], tonumber(ARGV[extra + 3])
local quota, consumer = ARGV[extra + 4], ARGV[extra + 5]
local weight, guaranteed = tonumber(ARGV[extra + 6]), tonumber(ARGV[extra + 7])
local keep = math.ceil(ttl * 2000)
local bad = 0
local function num(s)
  if s == nil or s == false then return nil end
  local v = tonumber(s)
  if v == nil or v ~= v or v == math.huge or v == -math.huge then return nil end
  return v
end
local function failed(r) return type(r) == 'table' and r.err ~= nil end
-- A command on a key of the caller's that someone filled with another type: the key is dropped
-- and counted, and the command runs again on a fresh one.
local function call(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if failed(r) then
    bad = bad + 1
    redis.call('DEL', key)
    r = redis.call(cmd, key, ...)
  end
  return r
end
call('ZADD', members, now, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now - ttl)
redis.call('PEXPIRE', members, keep)
local out = {}
-- A bucket's level now, refilled at the rate it was last written with (a new one is empty).
local function fill(key, rate, burst)
  local v = call('HMGET', key, 'l', 't', 'r', 'b')
  local level, ts = num(v[1]), num(v[2])
  local r0, b0 = num(v[3]) or rate, num(v[4]) or burst
  if level == nil or ts == nil or r0 < 0 or b0 < 0 then
    if v[1] or v[2] then bad = bad + 1 end
    return 0
  end
  level = math.max(-b0, math.min(b0, level))
  return math.min(b0, level + math.max(0, now - ts) * math.min(r0, rate))
end

local qbase = 'llmproxy:q:' .. quota .. ':'
local mine = qbase .. 'f:' .. consumer .. ':'
local function share(s)
  if type(s) ~= 'string' then return nil end
  local w, g = string.match(s, '^([^,]+),([^,]+)$')
  w, g = num(w), num(g)
  if w == nil or g == nil or w < 1 or w > 1000 or g < 0 or g > 100 then return nil end
  return w, g
end
-- The quota's consumers with their weights and guarantees: the owner's, as the operator wrote
-- them (read only to consumers), or where no operator runs, as each consumer declares its own.
local sharers = {}
if quota ~= '' then
  local owned = redis.pcall('HGETALL', qbase .. 'shares')
  if failed(owned) then bad = bad + 1; owned = {} end
  if #owned > 0 then
    for j = 1, #owned, 2 do
      local w, g = share(owned[j + 1])
      if w then sharers[#sharers + 1] = {owned[j], w, g} else bad = bad + 1 end
    end
  else
    local index = qbase .. 'consumers'
    redis.call('SET', mine .. 'share', weight .. ',' .. guaranteed, 'PX', keep)
    local r = redis.pcall('ZADD', index, now, consumer)
    if failed(r) then
      if string.find(r.err, 'NOPERM', 1, true) then
        return redis.error_reply('ERR the LlmQuota ' .. quota .. ' has no shares written yet')
      end
      call('ZADD', index, now, consumer)
    end
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
    redis.call('PEXPIRE', index, keep)
    for _, name in ipairs(redis.call('ZRANGE', index, 0, 999)) do
      local s = redis.pcall('GET', qbase .. 'f:' .. name .. ':share')
      local w, g = share(s)
      if w then sharers[#sharers + 1] = {name, w, g} elseif s then bad = bad + 1 end
    end
  end
end
local sumw, sumg, wme, gme = 0, 0, 0, 0
for _, c in ipairs(sharers) do
  sumw = sumw + c[2]
  sumg = sumg + c[3]
  if c[1] == consumer then wme, gme = c[2], c[3] end
end
-- Guarantees beyond the whole are scaled down to it.
local gscale = 1
if sumg > 100 then gscale = 100 / sumg end
local fair = 1
if quota ~= '' then
  fair = 0
  if wme > 0 then fair = gme * gscale / 100 + (wme / sumw) * math.max(0, 1 - sumg * gscale / 100) end
end

-- A consumer's demand on a bucket: its live members' together.
local function demand(name, suffix)
  local key = qbase .. 'f:' .. name .. ':' .. suffix .. ':d'
  local all = redis.pcall('HGETALL', key)
  if failed(all) then bad = bad + 1; return 0 end
  local sum = 0
  for j = 1, #all, 2 do
    local d, seen = string.match(all[j + 1], '^([^,]+),([^,]+)$')
    d, seen = num(d), num(seen)
    if d == nil or seen == nil or d < 0 then
      bad = bad + 1
      if name == consumer then redis.call('HDEL', key, all[j]) end
    elseif now - seen <= ttl then
      sum = sum + d
    elseif name == consumer then
      redis.call('HDEL', key, all[j])
    end
  end
  return sum
end
-- This consumer's rate of a quota bucket of `rate` per second.
local function allot(suffix, rate, asked)
  local own = mine .. suffix .. ':d'
  call('HSET', own, me, asked .. ',' .. now)
  redis.call('PEXPIRE', own, keep)
  local cap, got, mine_at = {}, {}, 0
  local left = rate
  for i, c in ipairs(sharers) do
    cap[i] = math.min(rate, demand(c[1], suffix) * 1.25)
    got[i] = math.min(cap[i], rate * c[3] * gscale / 100)
    left = left - got[i]
    if c[1] == consumer then mine_at = i end
  end
  if mine_at == 0 then return 0 end
  for _ = 1, #sharers do
    local w = 0
    for i, c in ipairs(sharers) do if got[i] < cap[i] then w = w + c[2] end end
    if w == 0 or left <= 0 then break end
    local full = false
    for i, c in ipairs(sharers) do
      if got[i] < cap[i] and cap[i] - got[i] <= left * c[2] / w then full = true end
    end
    if not full then
      for i, c in ipairs(sharers) do
        if got[i] < cap[i] then got[i] = got[i] + left * c[2] / w end
      end
      left = 0
      break
    end
    local before = left
    for i, c in ipairs(sharers) do
      if got[i] < cap[i] and cap[i] - got[i] <= before * c[2] / w then
        left = left - (cap[i] - got[i])
        got[i] = cap[i]
      end
    end
  end
  -- What nobody asks for goes, by weight, to those who ask at all, so they may grow into it.
  if left > 0 then
    local w = 0
    for i, c in ipairs(sharers) do if cap[i] > 0 then w = w + c[2] end end
    if w > 0 and cap[mine_at] > 0 then got[mine_at] = got[mine_at] + left * sharers[mine_at][2] / w end
  end
  return math.max(0, math.min(rate, got[mine_at]))
end

for i = 1, n do
  local key = KEYS[i]
  local b = (i - 1) * 6
  local rate, burst = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local ask, give, mode, asked = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 5], tonumber(ARGV[b + 6])
  if quota ~= '' then
    local r = allot(string.sub(key, #mine + 1), rate, asked)
    burst = math.max(burst * r / rate, math.min(burst, 1))
    rate = r
  end
  local level = fill(key, rate, burst)
  level = math.min(level, burst)
  level = math.min(burst, level + give)
  if mode == 'd' then level = math.min(level, 0) end
  local grant = 0
  if ask > 0 and level > 0 then grant = math.min(ask, level) end
  level = level - grant
  redis.call('HSET', key, 'l', tostring(level), 't', tostring(now), 'r', tostring(rate), 'b', tostring(burst))
  redis.call('PEXPIRE', key, math.ceil((math.min(burst / math.max(rate, 0.001), 3600) + 60) * 1000))
  out[i] = tostring(grant)
end
out[n + 1] = redis.call('ZCARD', members)
out[n + 2] = bad
out[n + 3] = tostring(fair)
return out
