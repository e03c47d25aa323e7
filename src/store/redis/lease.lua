--! Tollgate's lease script: a batch of operations on concurrency pools,
--! each atomic on its own, in order, at one instant of Redis's own clock.
--! The rules are `src/store/lease.rs`'s; the embedded store applies the
--! same ones.
--
-- Per operation i (1-based), two keys and seven arguments:
-- KEYS[2i-1]  the pool: a sorted set, member = lease id, score = its expiry
--             in microseconds of Redis's clock.
-- KEYS[2i]    the pool's weights: a hash, lease id -> weight, and the field
--             '' (no lease id is empty) -> the sum of the live weights.
--             Both keys carry the same hash tag as the scope's buckets; on
--             Cluster the caller sends only keys of one hash slot in one
--             call.
-- ARGV[7i-6]  op: 'a' acquire, 'r' renew, 'l' release
-- ARGV[7i-5]  the lease id (a member, never a key: it addresses nothing else)
-- ARGV[7i-4]  acquire: the limit, the most weight live at once, >= 1
-- ARGV[7i-3]  acquire: this lease's weight, 1..limit
-- ARGV[7i-2]  acquire: the weight the request must leave free (headroom)
-- ARGV[7i-1]  acquire, renew: time to live, microseconds, >= 1
-- ARGV[7i]    acquire: 1 for a dry run (judge, record nothing), else 0
--
-- Returns {now, then per operation: ok, expires_at, in_flight, earliest,
-- expired}: ok 1 or 0, or -1 when one of its keys holds another type (that
-- operation changed nothing and fails alone); the lease's expiry (0 unless
-- ok for acquire or renew); the live weight after the call; for a refused
-- acquire whose weight could ever fit, the earliest expiry of a live lease,
-- else -1; and how many expired leases this operation removed (never
-- released: the leak signal). Errors about the node (READONLY, OOM) fail
-- the whole call.
--
-- Clock: "now" is Redis's TIME in microseconds, read once for the batch. A
-- lease is live while now < expiry. Every lease expired at now is removed
-- (and its weight taken from the sum) before anything is counted, inside
-- this script, so a lease never outlives its expiry and no count sees a
-- dead one. Operations later in a batch see the earlier ones' writes, as if
-- they had all arrived at once. Both keys expire with the latest live
-- lease, so an abandoned pool costs nothing after it: an acquire makes
-- them live at least as long as its lease (PEXPIRE, or PEXPIRE GT on a
-- pool that holds leases, whose keys already expire with the latest), and
-- a renew, a release or expired leases removed set them again exactly.
-- An operation that changes nothing writes nothing.
--
-- The pool functions (expire, judge, add, keep) are lease_pool.lua's, sent
-- in front of this file; decide.lua uses the same ones for a lease taken
-- with a charge.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local P = pool_fns(now)

-- One operation; `a` is the index of its first argument.
local function one(pool, weights, a)
  local op, id = ARGV[a], ARGV[a + 1]
  local expired = P.expire(pool, weights)
  local ok, at, earliest = 0, 0, -1
  local in_flight, held
  -- A change that may shorten the keys' life: they are set again after.
  local changed = expired > 0

  if op == 'a' then
    local limit, weight, reserve = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local room
    room, held, in_flight, earliest = P.judge(pool, weights, id, limit, weight, reserve)
    if held then
      ok, at = 1, held
    elseif room then
      ok, at = 1, now + tonumber(ARGV[a + 5])
      if ARGV[a + 6] ~= '1' then
        -- add() keeps the keys at least as long as this lease.
        in_flight = P.add(pool, weights, id, at, weight, in_flight)
        changed = false
      end
    end
  else
    in_flight = tonumber(redis.call('HGET', weights, '') or '0')
    held = redis.call('ZSCORE', pool, id)
    if op == 'r' and held then
      ok, at = 1, now + tonumber(ARGV[a + 5])
      redis.call('ZADD', pool, P.int(at), id)
      changed = true
    elseif op == 'l' and held then
      ok = 1
      local w = tonumber(redis.call('HGET', weights, id) or '0')
      redis.call('ZREM', pool, id)
      redis.call('HDEL', weights, id)
      in_flight = redis.call('HINCRBY', weights, '', P.int(-w))
      changed = true
    end
  end

  if changed then
    in_flight = P.keep(pool, weights, in_flight)
  end
  return {ok, at, in_flight, earliest, expired}
end

-- A key of another type fails its own operation, before it wrote anything
-- (each operation reads both keys before its first write); any other error
-- is about the node and fails the call.
local out = {now}
for i = 1, #KEYS / 2 do
  local done, r = pcall(one, KEYS[2 * i - 1], KEYS[2 * i], 7 * i - 6)
  if not done then
    local msg = type(r) == 'table' and r.err or tostring(r)
    if not string.find(msg or '', 'WRONGTYPE') then
      error(r)
    end
    r = {-1, 0, 0, -1, 0}
  end
  for j = 1, 5 do
    out[#out + 1] = r[j]
  end
end
return out
