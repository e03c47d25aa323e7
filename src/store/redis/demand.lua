--! Tollgate's quota demand script: one replica publishes what its Envoy
--! quota streams hold of one limit, and reads the other replicas' live
--! entries, atomically, at one instant of Redis's own clock. The rules are
--! `src/store/demand.rs`'s.
--
-- KEYS[1]  the group: a hash, field = replica id (decimal), value =
--          "held:ask:streams:expires_at" (millitokens/s, millitokens/s, a
--          count, microseconds of Redis's clock). It carries the same hash
--          tag as the scope's buckets.
-- ARGV[1]  this replica's id (a field, never a key)
-- ARGV[2]  held: what its streams may hold after the call, >= 0
-- ARGV[3]  ask: what they ask for
-- ARGV[4]  streams: how many they are
-- ARGV[5]  limit: the limit's rate R; live entries never sum above it
-- ARGV[6]  ttl: how long the entry lives, microseconds, >= 1
-- ARGV[7]  max_replicas: the most live entries the group keeps
--
-- Returns {granted, others_held, others_ask, others_streams, others, now}:
-- what this replica may hold (written as its entry, unless 0 was granted
-- to a replica refused for the bound); the other live entries summed; and
-- now.
--
-- Clock: "now" is Redis's TIME in microseconds, read once. An entry is
-- live while now < expires_at; expired ones are removed before anything is
-- counted. The key expires with its latest entry, so a group no replica
-- writes costs nothing after it. Values stay below 2^50 (the caller
-- clamps), exact in Lua's doubles.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local group = KEYS[1]
local me = ARGV[1]
local held, ask, streams = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local limit, ttl, max_replicas = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

local function int(n)
  return string.format('%d', n)
end

local mine = nil
local o_held, o_ask, o_streams, o_count = 0, 0, 0, 0
local all = redis.call('HGETALL', group)
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local h, a, s, at = string.match(value, '^(%d+):(%d+):(%d+):(%d+)$')
  at = tonumber(at)
  if at == nil or at <= now then
    redis.call('HDEL', group, field)
  elseif field == me then
    mine = tonumber(h)
  else
    o_held = o_held + tonumber(h)
    o_ask = o_ask + tonumber(a)
    o_streams = o_streams + tonumber(s)
    o_count = o_count + 1
  end
end

if mine == nil and o_count >= max_replicas then
  return {0, o_held, o_ask, o_streams, o_count, now}
end

-- Keep or lower at will; raise only out of what the others leave.
local room = math.max(mine or 0, math.max(limit - o_held, 0))
local granted = math.min(held, room)
local expires = now + ttl
redis.call('HSET', group, me,
  int(granted) .. ':' .. int(ask) .. ':' .. int(streams) .. ':' .. int(expires))
redis.call('PEXPIRE', group, math.ceil(ttl / 1000))
return {granted, o_held, o_ask, o_streams, o_count, now}
