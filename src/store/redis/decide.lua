--! Tollgate's decision script: decide a batch of independent charges, each
--! atomic on its own, in order, at one instant of Redis's own clock.
--
-- A charge judges every one of its buckets, then takes the cost from all of
-- them or none. Charges do not see each other's failures: each gets its own
-- status, and a data error on one (a key of another type) is reported for
-- that charge only. Errors about the node (READONLY, OOM) fail the call.
--
-- KEYS     every bucket key of every charge, charge after charge. On Cluster
--          the caller sends only keys of one hash slot in one call.
-- ARGV[1]  every charge's numbers, packed (struct, little-endian), charge
--          after charge, so the script reads each bucket with one unpack
--          instead of a string and a tonumber per number:
--            '<BH'     mode, n
--                        mode  0 decide and take, 1 dry run (judge, take
--                              nothing), 2 refund: give back `cost` to every
--                              bucket, undoing an earlier take exactly (a
--                              Cluster charge spanning slots reserved in one
--                              slot and was denied in another);
--                        n     how many buckets (and KEYS) it has, >= 1;
--          then per bucket:
--            '<i4i8i8' capacity  C, tokens, 1 ..= 50,000,000
--                      period    P, microseconds for an empty bucket to
--                                refill, >= 1
--                      cost      n, tokens to take, >= 1; negative (-n)
--                                marks a shadow bucket, which is judged but
--                                never denies
--
-- Clock: "now" is Redis's TIME in microseconds, read once for the whole
-- batch, never the caller's clock, so every Tollgate replica shares one
-- clock. Charges later in a batch are judged at the same instant as earlier
-- ones, after their writes: as if they had all arrived at once.
--
-- State: GCRA. A bucket's value is its theoretical arrival time TAT =
-- ticks + frac/C microseconds (0 <= frac < C), the moment it is full again,
-- packed as 12 bytes: struct '<i8i4' (ticks, frac). One C call reads it and
-- one writes it, where the former "ticks:frac" text took a find, two subs,
-- two tonumbers and a format. The old text is still read (a value of any
-- other length), so buckets written before an upgrade keep their state.
-- An absent key is a full bucket. Taking n tokens moves the TAT by n*P/C
-- exactly; a bucket conforms when the new TAT is at most P ahead of now.
-- This mirrors src/bucket.rs, which is the reference.
--
-- Exactness: Lua 5.1 numbers are doubles, exact below 2^53. With P split as
-- q*C + r, n*P/C = n*q + n*r/C, where n*q <= P and n*r < C^2 < 2^53 (the
-- config caps C at 50,000,000), and now + P stays near 2^51, so every value
-- here is an exact integer and every floor() divides exactly. struct packs
-- and unpacks through 64-bit integers, exact for these values.
--
-- Expiry: a taken bucket gets PEXPIRE (SET .. PX) = time until full, so a
-- refilled bucket vanishes and memory follows active buckets only. A denied
-- or dry-run charge writes nothing.
--
-- Returns {now, then per charge: status, then per bucket: conforms, ticks, frac}
--   now       the batch's instant, microseconds since the Unix epoch
--   status    1 allowed (every non-shadow bucket held its cost), 0 denied,
--             -1 failed (a key of another type among its keys; nothing was
--             taken, and its triples mean nothing).
--             A refund answers 1.
--   conforms  1 when bucket i held its cost
--   ticks, frac  bucket i's TAT after the decision (taken or not), never
--             earlier than now. The caller derives remaining, reset_after and
--             retry_after from it with 128-bit integers.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local floor = math.floor
local pack, unpack = struct.pack, struct.unpack

-- Returns nil for an error about this charge's own data (a key of another
-- type), which fails that charge alone; raises any other (READONLY, OOM),
-- which is about the node and fails the whole call, so that the caller sees
-- Redis's own error.
local function own_error(reply)
  if string.find(reply.err or '', '^WRONGTYPE') then
    return nil
  end
  error(reply)
end

-- A bucket's TAT, never earlier than now; nil on a data error.
local function load(key, cap)
  local v = redis.pcall('GET', key)
  if not v then
    return now, 0
  end
  if type(v) ~= 'string' then
    return own_error(v)
  end
  local st, sf
  if #v == 12 then
    st, sf = unpack('<i8i4', v)
  else
    local sep = string.find(v, ':', 1, true)
    st = sep and tonumber(string.sub(v, 1, sep - 1))
    sf = sep and tonumber(string.sub(v, sep + 1))
    if not (st and sf) then
      return now, 0
    end
  end
  if sf >= cap then
    -- A reload may have shrunk the capacity: carry whole ticks out of frac.
    st = st + floor(sf / cap)
    sf = sf % cap
  end
  if st > now or (st == now and sf > 0) then
    return st, sf
  end
  return now, 0
end

-- Writes a bucket's state with its expiry, or forgets it when full. False
-- when Redis refused the write.
local function store(key, ticks, frac)
  if ticks < now or (ticks == now and frac == 0) then
    redis.call('DEL', key)
    return true
  end
  local until_full = ticks - now
  if frac > 0 then
    until_full = until_full + 1
  end
  local ms = floor((until_full + 999) / 1000)
  if ms < 1 then
    ms = 1
  end
  local ok = redis.pcall('SET', key, pack('<i8i4', ticks, frac), 'PX', ms)
  if type(ok) == 'table' and ok.err then
    return own_error(ok) ~= nil
  end
  return true
end

local out = { now }
-- Per bucket of the charge being decided: conforms, ticks, frac, new ticks,
-- new frac. Reused across charges, so a batch builds one table, not one per
-- bucket.
local judged = {}

local blob = ARGV[1]

-- Gives back each bucket's cost: TAT - cost*P/C, exactly. Returns the
-- position after the charge's numbers.
local function refund(k0, at, n)
  out[#out + 1] = 1
  for i = 1, n do
    local cap, period, cost
    cap, period, cost, at = unpack('<i4i8i8', blob, at)
    cost = math.abs(cost)
    local key = KEYS[k0 + i]
    local st, sf = load(key, cap)
    local ticks, frac = now, 0
    if st and (st > now or sf > 0) then
      -- Whole ticks, then borrow for the fraction.
      local q = floor(period / cap)
      local d = cost * (period - q * cap)
      st = st - cost * q
      if d > sf then
        local borrow = floor((d - sf + cap - 1) / cap)
        st = st - borrow
        sf = sf + borrow * cap
      end
      sf = sf - d
      store(key, st, sf)
      if st > now or (st == now and sf > 0) then
        ticks, frac = st, sf
      end
    end
    out[#out + 1] = 1
    out[#out + 1] = ticks
    out[#out + 1] = frac
  end
  return at
end

-- Judges a charge's buckets, then takes from all or none. Returns the
-- position after the charge's numbers.
local function decide(k0, at, n, dry)
  local allowed, failed = 1, false
  for i = 1, n do
    local cap, period, cost
    cap, period, cost, at = unpack('<i4i8i8', blob, at)
    local shadow = cost < 0
    if shadow then
      cost = -cost
    end
    local ticks, frac = load(KEYS[k0 + i], cap)
    if not ticks then
      failed = true
      ticks, frac = now, 0
    end
    local conforms = false
    local nt, nf = ticks, frac
    if cost <= cap then
      local q = floor(period / cap)
      local f = frac + cost * (period - q * cap)
      nt = ticks + cost * q
      if f >= cap then
        nt = nt + floor(f / cap)
        f = f % cap
      end
      nf = f
      local limit = now + period
      conforms = nt < limit or (nt == limit and nf == 0)
    end
    if not conforms and not shadow then
      allowed = 0
    end
    local j = (i - 1) * 5
    judged[j + 1], judged[j + 2], judged[j + 3] = conforms, ticks, frac
    judged[j + 4], judged[j + 5] = nt, nf
  end
  local status = #out + 1
  out[status] = allowed
  for i = 1, n do
    local j = (i - 1) * 5
    local conforms, ticks, frac = judged[j + 1], judged[j + 2], judged[j + 3]
    if allowed == 1 and not dry and not failed and conforms then
      ticks, frac = judged[j + 4], judged[j + 5]
      if not store(KEYS[k0 + i], ticks, frac) then
        failed = true
      end
    end
    out[#out + 1] = conforms and 1 or 0
    out[#out + 1] = ticks
    out[#out + 1] = frac
  end
  if failed then
    out[status] = -1
  end
  return at
end

local k0, at = 0, 1
while at <= #blob do
  local mode, n
  mode, n, at = unpack('<BH', blob, at)
  if mode == 2 then
    at = refund(k0, at, n)
  else
    at = decide(k0, at, n, mode == 1)
  end
  k0 = k0 + n
end
return out
