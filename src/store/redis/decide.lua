--! Tollgate's decision script: decide (or settle) a batch of independent
--! charges, each atomic on its own, in order, at one instant of Redis's own
--! clock.
--
-- A charge judges every one of its buckets, then takes the cost from all of
-- them or none. Charges do not see each other's failures: each gets its own
-- status, and a data error on one (a key of another type) is reported for
-- that charge only. Errors about the node (READONLY, OOM) fail the call.
--
-- KEYS     every key of every charge, charge after charge: its bucket keys,
--          then (a charge that opens a reservation, or a settle of one) the
--          key that records the reservation as open. On Cluster the caller sends only keys of
--          one hash slot in one call.
-- ARGV[1]  every charge's numbers, packed (struct, little-endian), charge
--          after charge, so the script reads each bucket with one unpack
--          instead of a string and a tonumber per number:
--            '<BH'     mode, n
--                        mode  0 decide and take, 1 dry run (judge, take
--                              nothing), 4 and 5 the same for a
--                              reservation (the reply carries each
--                              bucket's ledger), 2 settle (apply real costs to
--                              buckets charged earlier: a refund, or Cluster
--                              giving back a cross-slot reservation),
--                              3 settle a reservation: only while it is
--                              open (its record exists; the settle
--                              deletes it), so at most once, and only
--                              before its deadline; 8 added to 4 or 5: the
--                              charge also opens a reservation, writing
--                              its record when it takes; 16 added to 0,
--                              1, 4, 5 (and 12, 13): the charge is shaped
--                              (see Shaping below);
--                        n     how many buckets it has, >= 1;
--            (mode bit 64, a charge that takes a lease: the lease's
--            numbers and id; see "A lease with the charge" below)
--            (mode bit 32, a charge behind a penalty box, never shaped:
--            its rule and flags; see "The penalty box" below)
--            '<i8'     mode 3 only: the reservation's deadline, in
--                      microseconds of Redis's clock; modes 12, 13: how
--                      long the reservation stays open, in microseconds;
--          then per bucket:
--            '<i8i8i8i8' capacity  C, tokens (a budget: the budget), >= 1
--                        period    P > 0: a token bucket refilling in P
--                                  microseconds; < 0: a budget over fixed
--                                  windows of -P microseconds, aligned to
--                                  the epoch; 0: a budget over calendar
--                                  windows, whose boundaries follow
--                        cost      n, tokens to take (a settle: the
--                                  estimate taken then), >= 1; negative
--                                  (-n) marks a shadow bucket, which is
--                                  judged but never denies
--                        reserve   decide: tokens the request must leave (its
--                                  priority's headroom), >= 0;
--                                  settle: the real cost, >= 0, at most
--                                  cost + C (the caller caps it)
--            '<i8i8i8i8' P = 0 only: four window boundaries (µs, strictly
--                        increasing), computed by the replica around its
--                        own clock: the windows [b1,b2), [b2,b3), [b3,b4).
--                        The one holding Redis's clock is used, so the
--                        replica's clock never decides the window; if none
--                        does, the charge fails (status -2).
--            '<i8i8i8i8i8i8i8i8i8' settles only: the reservation's mark,
--                        taken ticks, taken frac (the state the charge left;
--                        ticks < 0 for none), born, given whole, given
--                        frac (the bucket's ledger then); then the
--                        difference |real - estimate| * P / C as whole
--                        microseconds and a fraction of C, computed by the
--                        caller in 128-bit integers (token buckets only);
--                        then the ceiling of the extra, whole and fraction:
--                        a bucket's furthest TAT past now (2P without
--                        headroom, (C - reserve)*P/C with it), a budget's
--                        highest spend (2C without, C - reserve with it).
--            '<i8'     shaped charges only, after each bucket's numbers
--                      (and window boundaries): the longest the request
--                      may wait for this bucket, in microseconds (0 for a
--                      shadow bucket or a budget, which never delay).
-- ARGV[2]  optional, '1': the caller vouches that every charge is a plain
--          mode-0 charge of one bucket and no other key, and that no key
--          appears twice. The script then reads every key with one MGET
--          instead of a GET per charge (see "Reading a batch at once").
--
-- Shaping (issue 24): a shaped charge's bucket that does not hold its cost
-- now, but would within its wait bound, conforms with that wait. The
-- charge's wait D is the largest of its buckets'; when it is allowed, each
-- token bucket is charged as of the release now + D: its TAT becomes
-- max(TAT, now + D) + n*P/C (src/bucket.rs, Shape::take_at), so the cost
-- released in any interval still fits C + r*t. The reply carries D right
-- after the charge's status.
--
-- Clock: "now" is Redis's TIME in microseconds, read once for the whole
-- batch, never the caller's clock, so every Tollgate replica shares one
-- clock. Charges later in a batch are judged at the same instant as earlier
-- ones, after their writes: as if they had all arrived at once.
--
-- State of a token bucket: GCRA. Its value is its theoretical arrival time
-- TAT = ticks + frac/C microseconds (0 <= frac < C), the moment it is full
-- again, and its ledger: when a reservation first took from it (born, µs;
-- 0 before that) and the refunds given since (given = whole + frac/C µs).
-- Packed with only what it holds: '<i8i4' (ticks, frac: 12 bytes) for the
-- common bucket, '<i8i4i8' (and born: 20 bytes) once a reservation took
-- from it, '<i8i4i8i8i8' (36 bytes) once it has given a refund. The old
-- "ticks:frac" text is still read. An absent key is a full bucket. Taking n tokens moves the
-- TAT by n*P/C exactly; a bucket conforms when the TAT it would have after
-- taking n + reserve is at most P ahead of now. A settle above the estimate
-- pushes the TAT further (debt: later requests wait), never past its
-- ceiling (so at most 2P past now), and never pulls it back; below, it pulls the TAT back by the difference but never by more
-- than the reservation still holds (the TAT it left, less every refund
-- given since, less now; nothing if the bucket was made again since), and
-- never before now: a bucket is never fuller than full, and tokens that
-- refilled on their own are never given back twice. This mirrors
-- src/bucket.rs, which is the reference.
--
-- State of a budget: 16 bytes '<i8i8' (the end of the window it counts,
-- the spend in it). A stored window other than the current one counts as
-- nothing spent. It conforms when spend + n + reserve <= C. Its key expires
-- at its window's end.
--
-- Exactness: Lua 5.1 numbers are doubles, exact below 2^53. Times are
-- microseconds since the epoch (about 2^51); a TAT is at most two periods
-- (P is at most 366 days, so under 2^46 µs) past now. With P split as q*C + r, n*P/C = n*q + n*r/C, where n*q <= P and
-- n*r < C^2 < 2^53 when n <= C (the config caps a bucket's C at 50,000,000
-- and a request's n + reserve at C); a settle's difference comes in whole
-- and fractional parts, at most P and below C (the caller caps the real
-- cost at the estimate plus C), and so does a settle's ceiling (2P). A bucket's given total only
-- grows while its key lives (it is forgotten when full): it would take 2^53
-- µs (285 years) of refunds to one never-full bucket to lose exactness. A
-- budget's C is at most 2^50 and its spend at most 2C = 2^51. Window arithmetic uses math.fmod, which is
-- exact. Every value is an exact integer and every floor() divides exactly.
--
-- Reading a batch at once: with ARGV[2], the lone-bucket path takes its
-- bucket's value from one MGET of every key, made before any write. No
-- charge can have written a key before its own charge reads it (no key
-- appears twice, and a lone charge writes only its own), so the value is
-- the one a GET would read. MGET answers nil both for an absent key and
-- for a key of another type, so a bucket it found absent is written with
-- NX and GET: a key of another type then refuses the write with
-- WRONGTYPE, and the charge fails (status -1) having written nothing, as a
-- GET's WRONGTYPE would make it. ARGV[2] also says every charge is a
-- plain lone bucket, whose header and numbers are then read at once.
-- One MGET costs Redis less than a GET per charge: about 4% of a charge's
-- instructions (script_cost.py --callgrind; docs/benchmarks.md).
--
-- Expiry: a written bucket gets PX = time until full, a budget PX = time
-- until its window ends, so memory follows active keys only. A denied or
-- dry-run charge writes nothing.
--
-- Open reservations: a charge that opens one writes its record (PX: its
-- settle_within) only when it takes; a settle needs the record and deletes
-- it. A record lost to eviction therefore refuses a settle (the estimate
-- stands) and can never let one apply twice.
--
-- Returns {now, then per charge: status, (shaped charges) its wait D in
-- microseconds (0 unless allowed), then per bucket: conforms, ticks, frac,
-- and (modes 2 to 5) born, given whole, given frac}
--   now       the batch's instant, microseconds since the Unix epoch
--   status    1 allowed (every non-shadow bucket held its cost) or settled,
--             0 denied, -1 failed (a key of another type among its keys),
--             -2 failed (no window passed holds Redis's clock), -3 the
--             reservation's deadline has passed, -4 it was settled before.
--             On any status below 1 but 0 nothing changed and the numbers
--             after it mean nothing.
--   conforms  1 when bucket i held its cost (a settle: 1; shaped: within
--             its wait bound)
--   ticks, frac  bucket i's state after the decision (taken or not): a
--             TAT never earlier than now, or a budget's window end and
--             spend. The caller derives remaining, reset_after and
--             retry_after from it with 128-bit integers.
--   born, given  bucket i's ledger (0, 0, 0 for a budget), for a reservation
--             to carry to its settle.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- Every key's value (false when absent or of another type), when the
-- caller asked for one read of the batch (ARGV[2]); before `unpack` below
-- names struct's.
local fetched = ARGV[2] == '1' and redis.call('MGET', unpack(KEYS)) or nil
-- Lua's own unpack (a list's items as arguments), by another name.
local spread = unpack
local floor, fmod = math.floor, math.fmod
-- The lone-bucket path reads these as upvalues: a global is a table lookup.
local keys, rpcall = KEYS, redis.pcall
local pack, unpack = struct.pack, struct.unpack

-- Returns nil for an error about this charge's own data (a key of another
-- type), which fails that charge alone; raises any other (READONLY, OOM),
-- which is about the node and fails the whole call, so that caller sees
-- Redis's own error.
local function own_error(reply)
  if string.find(reply.err or '', '^WRONGTYPE') then
    return nil
  end
  error(reply)
end

-- string.format, for the milliseconds of a PX (see set()).
local format = string.format

local out = { now }
-- Per bucket of the charge being decided: conforms, ticks, frac, new ticks,
-- new frac, window end (0 for a token bucket), born, given whole, given
-- frac. Reused across charges, so a batch builds one table, not one per
-- bucket.
local judged = {}

-- The last PX text decide_lone made for a fresh bucket, and its
-- milliseconds: a fresh bucket's time until full depends only on its
-- limit and cost, so most fresh buckets of a batch share theirs, and a
-- comparison costs Redis a tenth of a string.format (script_cost.py
-- --callgrind).
local fresh_ms, fresh_px = nil, nil

-- The PX text of a fresh bucket's `ms`, from the last one's when equal.
local function fresh_text(ms)
  if ms ~= fresh_ms then
    fresh_ms = ms
    fresh_px = format('%d', ms)
  end
  return fresh_px
end

local blob = ARGV[1]

-- The hot case, decided in one pass: a lone token bucket taken at its cost
-- (mode 0, no headroom, not a shadow), whose state is absent or the plain
-- 12 bytes. Takes the charge's numbers, which the caller read with its
-- header; returns true, or nil, having written nothing, for anything else,
-- and the caller decides the charge with decide() from the same position.
-- It computes exactly what decide() would for this case, with fewer table
-- and function steps (10-15% of a charge's script time, measured).
local function decide_lone(k0, cap, period, cost, reserve)
  if period <= 0 or cost < 1 or reserve ~= 0 or cost > cap then
    return nil
  end
  local key = keys[k0 + 1]
  local v
  if fetched then
    v = fetched[k0 + 1]
  else
    v = rpcall('GET', key)
  end
  local ticks, frac = now, 0
  if v then
    -- Not the 12 bytes (or a GET's error table, whose length is 0).
    if #v ~= 12 then
      return nil
    end
    ticks, frac = unpack('<i8i4', v)
    if frac >= cap or frac < 0 then
      return nil
    end
    if ticks < now or (ticks == now and frac == 0) then
      ticks, frac = now, 0
    end
  end
  -- advance() and then store() and set(), written out: a function call
  -- costs the interpreter more than its arithmetic.
  local r = period % cap
  local q = (period - r) / cap
  local nf = frac + cost * r
  local nt = ticks + cost * q
  if nf >= cap then
    local m = nf % cap
    nt = nt + (nf - m) / cap
    nf = m
  end
  local limit = now + period
  local o = #out
  if nt < limit or (nt == limit and nf == 0) then
    -- A take leaves the bucket short of full (its TAT past now), and this
    -- bucket has no ledger: 12 bytes, PX until full, at least 1 ms. A
    -- bucket MGET found absent may be a key of another type: NX leaves
    -- such a key alone, and with GET Redis answers WRONGTYPE for it, and
    -- nil when it wrote: a nil costs the script less to read than SET's
    -- OK, a table of its own (3% of a charge, script_cost.py --callgrind).
    local ms = nt - now + (nf > 0 and 1 or 0) + 999
    ms = (ms - ms % 1000) / 1000
    if v then
      ms = format('%d', ms)
    elseif ms == fresh_ms then
      -- fresh_text(), written out.
      ms = fresh_px
    else
      fresh_ms = ms
      ms = format('%d', ms)
      fresh_px = ms
    end
    local ok
    if fetched and not v then
      ok = rpcall('SET', key, pack('<i8i4', nt, nf), 'PX', ms, 'NX', 'GET')
      ok = not ok or (ok.err and own_error(ok))
    else
      ok = rpcall('SET', key, pack('<i8i4', nt, nf), 'PX', ms)
      ok = ok and (not ok.err or own_error(ok))
    end
    if ok then
      out[o + 1] = 1
    else
      out[o + 1] = -1
    end
    out[o + 2], out[o + 3], out[o + 4] = 1, nt, nf
  else
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 0, 0, ticks, frac
  end
  return true
end

-- Everything but the lone path, made on the first charge that needs it:
-- Redis runs this whole file on every call, and each function defined at
-- the top level is a closure made per call, its upvalues bound one by one.
-- A batch of plain lone charges (scenario (a)) needs none of them: making
-- them anyway cost 5-8% of such a charge's instructions (script_cost.py
-- --callgrind).
local general_fns = nil
local function general()
  if general_fns then
    return general_fns
  end

  -- A key's raw value: false when absent, nil on a data error.
  local function get(key)
    local v = redis.pcall('GET', key)
    if not v then
      return false
    end
    if type(v) ~= 'string' then
      return own_error(v)
    end
    return v
  end

  -- A bucket's TAT, never earlier than now, and its ledger (born, given
  -- whole, given frac); nil on a data error. An absent bucket is made now
  -- (born 0: a bucket gets its birth time when a reservation first takes
  -- from it; see store).
  local function load(key, cap)
    local v = get(key)
    if v == nil then
      return nil
    end
    if not v then
      return now, 0, 0, 0, 0
    end
    local st, sf
    local born, gw, gf = 0, 0, 0
    local len = #v
    if len == 12 then
      st, sf = unpack('<i8i4', v)
    elseif len == 20 then
      st, sf, born = unpack('<i8i4i8', v)
    elseif len == 36 then
      st, sf, born, gw, gf = unpack('<i8i4i8i8i8', v)
    else
      local sep = string.find(v, ':', 1, true)
      st = sep and tonumber(string.sub(v, 1, sep - 1))
      sf = sep and tonumber(string.sub(v, sep + 1))
      if not (st and sf) then
        return now, 0, born, gw, gf
      end
    end
    if sf >= cap then
      -- A reload may have shrunk the capacity: carry whole ticks out of frac.
      st = st + floor(sf / cap)
      sf = sf % cap
    end
    if st > now or (st == now and sf > 0) then
      return st, sf, born, gw, gf
    end
    return now, 0, born, gw, gf
  end

  -- Writes with PX, false when Redis refused the write (a data error). The
  -- milliseconds go as text made here: Redis 7.0 and older print a number
  -- argument with snprintf('%.17g'), a float's digits, and later versions
  -- print whole numbers quickly themselves; '%d' is exact either way.
  local function set(key, value, until_us)
    local ms = floor((until_us + 999) / 1000)
    if ms < 1 then
      ms = 1
    end
    local ok = redis.pcall('SET', key, value, 'PX', format('%d', ms))
    if type(ok) == 'table' and ok.err then
      return own_error(ok) ~= nil
    end
    return true
  end

  -- Writes a bucket's state and ledger with its expiry, or forgets it when
  -- full. A bucket a refund just made full is kept for a millisecond, so a
  -- take in the same microsecond finds its ledger, not a new bucket with the
  -- same birth time. Only what the ledger holds is written: 12 bytes for a
  -- bucket no reservation has taken from (born 0) and that never refunded.
  local function store(key, ticks, frac, born, gw, gf)
    local full = ticks < now or (ticks == now and frac == 0)
    if full and gw == 0 and gf == 0 then
      redis.call('DEL', key)
      return true
    end
    local until_full = ticks - now
    if frac > 0 then
      until_full = until_full + 1
    end
    if gw == 0 and gf == 0 then
      if born == 0 then
        return set(key, pack('<i8i4', ticks, frac), until_full)
      end
      return set(key, pack('<i8i4i8', ticks, frac, born), until_full)
    end
    return set(key, pack('<i8i4i8i8i8', ticks, frac, born, gw, gf), until_full)
  end

  -- tat + n*P/C, exactly (n <= C).
  local function advance(ticks, frac, n, cap, period)
    local q = floor(period / cap)
    local f = frac + n * (period - q * cap)
    local nt = ticks + n * q
    if f >= cap then
      nt = nt + floor(f / cap)
      f = f % cap
    end
    return nt, f
  end

  -- The functions that budgets, headroom and settles need, made on first use:
  -- Redis runs this whole file on every call, and each function defined at
  -- the top level is a closure made per call (about 0.05 µs each). The plain
  -- token-bucket decision, the hot path, needs none of these.
  local rare = nil
  local function rare_fns()
    if rare then
      return rare
    end
    -- A budget's spend in the window ending at wend; nil on a data error.
    local function load_spend(key, wend)
      local v = get(key)
      if v == nil then
        return nil
      end
      if v and #v == 16 then
        local e, spent = unpack('<i8i8', v)
        if e == wend then
          return spent
        end
      end
      return 0
    end

    local function store_spend(key, wend, spent)
      return set(key, pack('<i8i8', wend, spent), wend - now)
    end

    -- The end of a budget's window holding now (false when none of the passed
    -- windows does), and the position after its numbers.
    local function window_end(period, at)
      local wend = 0
      if period < 0 then
        wend = now - fmod(now, -period) - period
      elseif period == 0 then
        local b1, b2, b3, b4
        b1, b2, b3, b4, at = unpack('<i8i8i8i8', blob, at)
        if b1 <= now and now < b2 then
          wend = b2
        elseif b2 <= now and now < b3 then
          wend = b3
        elseif b3 <= now and now < b4 then
          wend = b4
        else
          wend = false
        end
      end
      return wend, at
    end

    -- Reads one bucket's numbers: capacity, period, cost, its fourth number,
    -- and for a budget its window's end. Returns them and the next position.
    local function read(at)
      local cap, period, cost, fourth
      cap, period, cost, fourth, at = unpack('<i8i8i8i8', blob, at)
      local wend = 0
      if period <= 0 then
        wend, at = window_end(period, at)
      end
      return cap, period, cost, fourth, wend, at
    end

    -- a - b for two times of the form whole + frac/cap: nil when negative.
    local function minus(aw, af, bw, bf, cap)
      local w, f = aw - bw, af - bf
      if f < 0 then
        w, f = w - 1, f + cap
      end
      if w < 0 then
        return nil
      end
      return w, f
    end

    -- One token bucket's settle: its state and ledger after the real cost.
    -- m holds the reservation's mark (taken ticks and frac, born, given whole
    -- and frac; taken ticks < 0 for none) and the difference (dw, df).
    local function settle_tokens(key, cap, est, actual, m)
      local st, sf, born, gw, gf = load(key, cap)
      if not st then
        return nil
      end
      local dw, df = m[6], m[7]
      if actual > est then
        local nt, nf = st + dw, sf + df
        if nf >= cap then
          nt, nf = nt + 1, nf - cap
        end
        -- Never past the ceiling; a TAT already past it stays.
        local ct, cf = now + m[8], m[9]
        if nt > ct or (nt == ct and nf > cf) then
          if not (st > ct or (st == ct and sf > cf)) then
            st, sf = ct, cf
          end
        else
          st, sf = nt, nf
        end
        return st, sf, born, gw, gf, store(key, st, sf, born, gw, gf)
      end
      if m[1] >= 0 then
        -- No more than the reservation still holds: the TAT it left, less
        -- every refund given since, less now; nothing if the bucket was made
        -- again since.
        local hw, hf = 0, 0
        local sw, sf2 = minus(gw, gf, m[4], m[5], cap)
        if m[3] == born and sw then
          local tw, tf = minus(m[1], m[2], sw, sf2, cap)
          if tw then
            hw, hf = minus(tw, tf, now, 0, cap)
            if not hw then
              hw, hf = 0, 0
            end
          end
        end
        if hw < dw or (hw == dw and hf < df) then
          dw, df = hw, hf
        end
      end
      st, sf = st - dw, sf - df
      if sf < 0 then
        st, sf = st - 1, sf + cap
      end
      if st < now or (st == now and sf == 0) then
        st, sf = now, 0
      end
      gw, gf = gw + dw, gf + df
      if gf >= cap then
        gw, gf = gw + 1, gf - cap
      end
      return st, sf, born, gw, gf, store(key, st, sf, born, gw, gf)
    end

    -- One budget's settle: its window's end and spend after the real cost.
    local function settle_spend(key, est, actual, wend, taken, ceiling)
      local spent = load_spend(key, wend)
      if not spent then
        return nil
      end
      if actual >= est then
        -- Never past the ceiling; a spend already past it stays.
        local grown = spent + (actual - est)
        if grown > ceiling then
          grown = ceiling
        end
        if grown > spent then
          spent = grown
        end
      elseif taken < 0 or taken == wend then
        spent = spent - (est - actual)
        if spent < 0 then
          spent = 0
        end
      end
      return wend, spent, 0, 0, 0, store_spend(key, wend, spent)
    end

    -- Applies real costs to every bucket of a charge. Returns the position
    -- after the charge's numbers.
    local function settle(k0, at, n, once)
      local status = #out + 1
      out[status] = 1
      local deadline
      if once then
        deadline, at = unpack('<i8', blob, at)
      end
      -- Read everything first: a refusal must change nothing.
      local parts = {}
      local refused = false
      for i = 1, n do
        local cap, period, est, actual, wend
        cap, period, est, actual, wend, at = read(at)
        local m = {}
        m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], at =
          unpack('<i8i8i8i8i8i8i8i8i8', blob, at)
        if est < 0 then
          est = -est
        end
        if not wend then
          refused = -2
        elseif get(KEYS[k0 + i]) == nil then
          -- A key of another type: fail before writing any bucket.
          refused = -1
        end
        parts[i] = { cap, period, est, actual, wend, m }
      end
      local marker = once and KEYS[k0 + n + 1]
      if once and now > deadline then
        refused = -3
      elseif once and redis.call('EXISTS', marker) == 0 then
        refused = -4
      end
      if refused then
        out[status] = refused
        for _ = 1, n * 6 do
          out[#out + 1] = 0
        end
        return at
      end
      for i = 1, n do
        local p = parts[i]
        local a, b, c, d, e, ok
        if p[2] > 0 then
          a, b, c, d, e, ok = settle_tokens(KEYS[k0 + i], p[1], p[3], p[4], p[6])
        else
          a, b, c, d, e, ok = settle_spend(KEYS[k0 + i], p[3], p[4], p[5], p[6][1], p[6][8])
        end
        if not a or not ok then
          out[status] = -1
          a, b, c, d, e = 0, 0, 0, 0, 0
        end
        local o = #out
        out[o + 1], out[o + 2], out[o + 3] = 1, a, b
        out[o + 4], out[o + 5], out[o + 6] = c, d, e
      end
      if once then
        redis.call('DEL', marker)
      end
      return at
    end

    rare = {
      load_spend = load_spend,
      store_spend = store_spend,
      window_end = window_end,
      settle = settle,
    }
    return rare
  end

  -- ---------------------------------------------------------------------
  -- Shaping (issue 24). Per bucket of a shaped charge: capacity, period,
  -- cost, at 3i-2, 3i-1, 3i (token buckets only).
  local shaping = {}

  -- Bucket i's state after taking its cost as of the release s, from its
  -- state before (ticks, frac, never earlier than now): max(TAT, s) + n*P/C.
  local function take_at(ticks, frac, s, i)
    if ticks < s or (ticks == s and frac == 0) then
      ticks, frac = s, 0
    end
    return advance(ticks, frac, shaping[i * 3], shaping[i * 3 - 2], shaping[i * 3 - 1])
  end
  -- ---------------------------------------------------------------------

  -- ---------------------------------------------------------------------
  -- A lease with the charge (mode bit 64, issue 20). src/store/lease.rs is
  -- the reference; lease.lua applies the same rules to a lease alone, with
  -- the same pool functions (lease_pool.lua, sent in front of this file).
  --
  -- A charge with the bit set carries, right after its header,
  -- '<i8i8i8i8H' (the pool's limit, the lease's weight, the weight its
  -- priority must leave free, its time to live in microseconds; the id's
  -- length) and the id's bytes, then the rest of the charge as usual; its
  -- last two keys are the pool's, in the slot of its buckets. Before any
  -- bucket is judged, the pool's expired leases are removed and the pool is
  -- judged at the same now: room when the id is live (counted once) or its
  -- weight and reserve fit beside the live weight. No room denies the charge
  -- (its buckets are judged and nothing is taken); room, with the charge
  -- allowed and not a dry run, records the lease in the same step as the
  -- take. Its reply is the charge's, then five integers (before a penalty
  -- box's three): room 1 or 0 (-1: a pool key holds another type, and the
  -- charge failed having taken nothing), the lease's expiry (0 without
  -- room), the live weight, the earliest live expiry when there was no room
  -- and the weight could ever fit (else -1), the expired leases removed.
  -- ---------------------------------------------------------------------
  local leasing = nil
  local function lease_fns()
    if leasing then
      return leasing
    end
    local P = pool_fns(now)

    -- Reads a lease's numbers and id at `at`; returns it and the position
    -- after it.
    local function read(at)
      local l = {}
      local len
      l.limit, l.weight, l.reserve, l.ttl, len, at = unpack('<i8i8i8i8H', blob, at)
      l.id = string.sub(blob, at, at + len - 1)
      return l, at + len
    end

    -- Removes the expired leases and judges the acquire; nil when a pool key
    -- holds another type (nothing was written: both are read first).
    local function judge(l)
      local keys = { KEYS[l.k + 1], KEYS[l.k + 2] }
      local done, r = pcall(function()
        local expired = P.expire(keys[1], keys[2])
        local room, held, in_flight, earliest =
          P.judge(keys[1], keys[2], l.id, l.limit, l.weight, l.reserve)
        return {
          keys = keys, room = room, held = held, in_flight = in_flight,
          earliest = earliest, expired = expired,
          at = room and (held or now + l.ttl) or 0,
        }
      end)
      if done then
        return r
      end
      local msg = type(r) == 'table' and r.err or tostring(r)
      if not string.find(msg or '', 'WRONGTYPE') then
        error(r)
      end
      return nil
    end

    -- Records the lease when the charge took, keeps the keys' expiry, and
    -- appends the five integers of the reply.
    local function finish(l, pool, took)
      local o = #out
      if not pool then
        out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = -1, 0, 0, -1, 0
        return
      end
      local in_flight = pool.in_flight
      if took and not pool.held then
        in_flight = P.add(pool.keys[1], pool.keys[2], l.id, pool.at, l.weight, in_flight)
      elseif pool.expired > 0 then
        in_flight = P.keep(pool.keys[1], pool.keys[2], in_flight)
      end
      out[o + 1], out[o + 2], out[o + 3] = pool.room and 1 or 0, pool.at, in_flight
      out[o + 4], out[o + 5] = pool.earliest, pool.expired
    end

    leasing = { read = read, judge = judge, finish = finish }
    return leasing
  end
  -- ------------------------------ end of a lease with the charge --------

  -- Judges a charge's buckets, then takes from all or none. Returns the
  -- position after the charge's numbers.
  local function decide(k0, at, n, dry, marked, open, shaped, lease)
    local allowed, failed = 1, false
    local wait = 0
    local pool
    if lease then
      pool = lease_fns().judge(lease)
      if not pool then
        allowed, failed = 0, true
      elseif not pool.room then
        allowed = 0
      end
    end
    local within
    if open then
      within, at = unpack('<i8', blob, at)
    end
    for i = 1, n do
      -- Read inline: the token bucket is the hot case.
      local cap, period, cost, reserve
      cap, period, cost, reserve, at = unpack('<i8i8i8i8', blob, at)
      local wend = 0
      if period <= 0 then
        wend, at = rare_fns().window_end(period, at)
      end
      local bound = 0
      if shaped then
        bound, at = unpack('<i8', blob, at)
      end
      local shadow = cost < 0
      if shadow then
        cost = -cost
      end
      local key = KEYS[k0 + i]
      local conforms = false
      local ticks, frac, nt, nf
      local born, gw, gf = 0, 0, 0
      if period > 0 then
        ticks, frac, born, gw, gf = load(key, cap)
        if not ticks then
          failed = true
          ticks, frac, born, gw, gf = now, 0, 0, 0, 0
        end
        if marked and born == 0 then
          -- A reservation takes from it: from now on it has a birth time, so
          -- a bucket forgotten and made again is told apart from this one.
          born = now
        end
        nt, nf = ticks, frac
        if cost + reserve <= cap then
          nt, nf = advance(ticks, frac, cost, cap, period)
          local ct, cf = nt, nf
          if reserve > 0 then
            ct, cf = advance(ticks, frac, cost + reserve, cap, period)
          end
          local limit = now + period
          conforms = ct < limit or (ct == limit and cf == 0)
          if not conforms and bound > 0 then
            -- Shaping: the wait until it conforms, ceil(check - P) - now.
            local need = ct - period - now
            if cf > 0 then
              need = need + 1
            end
            if need <= bound then
              conforms = true
              if not shadow and need > wait then
                wait = need
              end
            end
          end
          if shaped then
            shaping[i * 3 - 2], shaping[i * 3 - 1], shaping[i * 3] = cap, period, cost
          end
        end
        wend = 0
      elseif not wend then
        failed = 'window'
        ticks, frac, nt, nf, wend = 0, 0, 0, 0, 0
      else
        local spent = rare_fns().load_spend(key, wend)
        if not spent then
          failed = true
          spent = 0
        end
        ticks, frac = wend, spent
        nt, nf = wend, spent + cost
        conforms = spent + cost + reserve <= cap
      end
      if not conforms and not shadow then
        allowed = 0
      end
      local j = (i - 1) * 9
      judged[j + 1], judged[j + 2], judged[j + 3] = conforms, ticks, frac
      judged[j + 4], judged[j + 5], judged[j + 6] = nt, nf, wend
      judged[j + 7], judged[j + 8], judged[j + 9] = born, gw, gf
    end
    local status = #out + 1
    out[status] = allowed
    if shaped then
      if allowed ~= 1 then
        wait = 0
      end
      out[status + 1] = wait
    end
    for i = 1, n do
      local j = (i - 1) * 9
      local conforms, ticks, frac = judged[j + 1], judged[j + 2], judged[j + 3]
      local born, gw, gf = judged[j + 7], judged[j + 8], judged[j + 9]
      if allowed == 1 and not dry and not failed and conforms then
        if wait > 0 and judged[j + 6] == 0 then
          ticks, frac = take_at(ticks, frac, now + wait, i)
        else
          ticks, frac = judged[j + 4], judged[j + 5]
        end
        local wend = judged[j + 6]
        local ok
        if wend > 0 then
          ok = rare_fns().store_spend(KEYS[k0 + i], wend, frac)
        else
          ok = store(KEYS[k0 + i], ticks, frac, born, gw, gf)
        end
        if not ok then
          failed = true
        end
      end
      local o = #out
      out[o + 1], out[o + 2], out[o + 3] = conforms and 1 or 0, ticks, frac
      if marked then
        out[o + 4], out[o + 5], out[o + 6] = born, gw, gf
      end
    end
    if lease then
      lease_fns().finish(lease, pool, allowed == 1 and not dry and not failed)
    end
    if failed == 'window' then
      out[status] = -2
    elseif failed then
      out[status] = -1
    elseif open and allowed == 1 and not dry then
      -- Taken: record the reservation as open. Should the write fail, it
      -- cannot settle and its estimate stands.
      set(KEYS[k0 + n + 1], '1', within)
    end
    return at
  end

  -- The hot case of several buckets, as decide_lone for one: a plain charge
  -- (mode 0) whose buckets are all token buckets taken at their cost (no
  -- headroom, no shadow), whose states are absent or the plain 12 bytes.
  -- Returns nil, having written nothing, for anything else, and the caller
  -- decides the charge with decide() from the same position. It reads the
  -- charge's keys with one MGET and computes what decide() would.
  --
  -- MGET answers nil for a key of another type as for an absent one, so the
  -- buckets it found absent are written first, with NX: should one refuse
  -- (a key of another type), those made before it are deleted (they were
  -- absent) and the charge fails (status -1) having changed nothing, as a
  -- GET's WRONGTYPE would make it. A denied charge writes nothing, but a
  -- key of another type must fail it rather than count as a full bucket: one
  -- EXISTS of the buckets MGET found absent tells them apart. A key the
  -- charge names twice is judged twice from the same state and written
  -- twice, the last write standing, as decide() does.
  local function decide_plain(k0, at, n)
    local vals = redis.call('MGET', spread(keys, k0 + 1, k0 + n))
    local allowed = 1
    for i = 1, n do
      local cap, period, cost, reserve
      cap, period, cost, reserve, at = unpack('<i8i8i8i8', blob, at)
      if period <= 0 or cost < 1 or reserve ~= 0 or cost > cap then
        return nil
      end
      local v = vals[i]
      local ticks, frac = now, 0
      if v then
        if #v ~= 12 then
          return nil
        end
        ticks, frac = unpack('<i8i4', v)
        if frac >= cap or frac < 0 then
          return nil
        end
        if ticks < now or (ticks == now and frac == 0) then
          ticks, frac = now, 0
        end
      end
      local q = floor(period / cap)
      local nf = frac + cost * (period - q * cap)
      local nt = ticks + cost * q
      if nf >= cap then
        nt = nt + floor(nf / cap)
        nf = nf % cap
      end
      local limit = now + period
      local conforms = nt < limit or (nt == limit and nf == 0)
      if not conforms then
        allowed = 0
      end
      local j = (i - 1) * 5
      judged[j + 1], judged[j + 2], judged[j + 3] = conforms, ticks, frac
      judged[j + 4], judged[j + 5] = nt, nf
    end
    local status = allowed
    if allowed == 0 then
      local absent = nil
      for i = 1, n do
        if not vals[i] then
          absent = absent or {}
          absent[#absent + 1] = keys[k0 + i]
        end
      end
      if absent and redis.call('EXISTS', spread(absent)) > 0 then
        status = -1
      end
    else
      -- Absent first (NX), then the rest; each taken bucket is left short of
      -- full with no ledger: 12 bytes, PX until full.
      for pass = 1, 2 do
        for i = 1, n do
          local v = vals[i]
          if (pass == 1) == not v then
            local j = (i - 1) * 5
            local nt, nf = judged[j + 4], judged[j + 5]
            local key = keys[k0 + i]
            local ms = floor((nt - now + (nf > 0 and 1 or 0) + 999) / 1000)
            local ok
            if v then
              ms = format('%d', ms)
            else
              ms = fresh_text(ms)
              -- NX and GET, as in decide_lone: nil when written, WRONGTYPE
              -- for a key of another type. A string can only be this
              -- charge's own, written a moment ago under a repeated key:
              -- write it again.
              ok = rpcall('SET', key, pack('<i8i4', nt, nf), 'PX', ms, 'NX', 'GET')
              if type(ok) == 'string' then
                v = ok
              end
            end
            if v then
              ok = rpcall('SET', key, pack('<i8i4', nt, nf), 'PX', ms)
            end
            if ok and ok.err and not own_error(ok) then
              for m = 1, i - 1 do
                if not vals[m] then
                  redis.call('DEL', keys[k0 + m])
                end
              end
              status = -1
              break
            end
          end
        end
        if status == -1 then
          break
        end
      end
    end
    local o = #out
    out[o + 1] = status
    for i = 1, n do
      local j = (i - 1) * 5
      local conforms = judged[j + 1]
      if allowed == 1 then
        out[o + 3 * i - 1], out[o + 3 * i], out[o + 3 * i + 1] = 1, judged[j + 4], judged[j + 5]
      else
        out[o + 3 * i - 1], out[o + 3 * i], out[o + 3 * i + 1] =
          conforms and 1 or 0, judged[j + 2], judged[j + 3]
      end
    end
    return at
  end

  -- ---------------------------------------------------------------------
  -- The penalty box (mode bit 32). src/store/penalty.rs is the reference.
  --
  -- A charge with the bit set carries, right after its header, its scope's
  -- rule '<i8i8i8i8i8i8i8' (strikes, within, ban, factor, max_ban,
  -- forgive_after, times in microseconds; then 1 when the charge is a
  -- strike whatever its decision, a reported one) and one byte per bucket
  -- (1: a denial by this bucket is a strike), then the rest of the charge as
  -- usual; its last two keys are the caller's record
  -- ('<prefix>{<scope>}:%pen:...', in the slot of the buckets), '<i8i8i8i8i8'
  -- (window start, strikes in it, level, ban until, last strike), and the
  -- scope's index of bans ('<prefix>{<scope>}:%bans', see penalty.lua),
  -- written only when a ban starts. A banned
  -- caller (now < ban until) is denied without reading a bucket; otherwise
  -- the charge is decided as usual, and a denial (not a dry run) by a
  -- striking bucket counts a strike, the strikes-th in the window starting a
  -- ban of ban * factor^level, at most max_ban; the level is forgiven after
  -- forgive_after without a strike or a ban. The record expires when it
  -- means nothing any more. Its reply is the charge's as usual (all zeros
  -- when banned), then three more integers: the ban's end (0 for none), 1
  -- when this charge started it, 1 when this charge struck.
  -- ---------------------------------------------------------------------
  local penalty = nil
  local function penalty_fns()
    if penalty then
      return penalty
    end
    local max, min = math.max, math.min

    -- The record at key as a table, {0,0,0,0,0} when absent; nil on a data
    -- error.
    local function load_record(key)
      local v = get(key)
      if v == nil then
        return nil
      end
      if v and #v == 40 then
        local a, b, c, d, e = unpack('<i8i8i8i8i8', v)
        return { a, b, c, d, e }
      end
      return { 0, 0, 0, 0, 0 }
    end

    local function ban_at(r, level)
      local d = min(r.ban, r.max_ban)
      for _ = 1, level do
        if d >= r.max_ban or r.factor <= 1 then
          break
        end
        d = min(d * r.factor, r.max_ban)
      end
      return d
    end

    -- Counts a strike at now; true when it starts a ban.
    local function strike(rec, r)
      if rec[3] > 0 and now >= max(rec[5], rec[4]) + r.forgive then
        rec[3] = 0
      end
      if rec[2] == 0 or now >= rec[1] + r.within then
        rec[1], rec[2] = now, 0
      end
      rec[2], rec[5] = rec[2] + 1, now
      if rec[2] < r.strikes then
        return false
      end
      rec[4] = now + ban_at(r, rec[3])
      rec[3] = min(rec[3] + 1, 64)
      rec[2] = 0
      return true
    end

    local function forget_at(rec, r)
      return max(max(rec[5], rec[4]) + r.forgive, rec[1] + r.within, rec[4])
    end

    -- The position after a charge's numbers, unread.
    local function skip(at, n, open)
      if open then
        at = at + 8
      end
      for _ = 1, n do
        local _, period = unpack('<i8i8', blob, at)
        at = at + 32
        if period == 0 then
          at = at + 32
        end
      end
      return at
    end

    -- A charge answered without its buckets: status, zeros, the trailer.
    local function answer(status, n, per, ban_until, lease)
      out[#out + 1] = status
      for _ = 1, n * per + (lease and 5 or 0) do
        out[#out + 1] = 0
      end
      local o = #out
      out[o + 1], out[o + 2], out[o + 3] = ban_until, 0, 0
    end

    -- Lists a ban in the scope's index (the key after the record's): a
    -- sorted set of the record keys' caller parts by ban end, kept while
    -- its latest ban lasts, for ListBans. A failure here fails nothing.
    local function index_ban(index, key, ban_until)
      local member = string.match(key, '.*:%%pen:(.*)$') or key
      redis.pcall('ZREMRANGEBYSCORE', index, '-inf', now)
      redis.pcall('ZADD', index, ban_until, member)
      local ms = floor((ban_until - now + 999) / 1000)
      local ttl = redis.pcall('PTTL', index)
      if type(ttl) == 'number' and ttl < ms then
        redis.pcall('PEXPIRE', index, ms)
      end
    end

    local function penalized(k0, at, n, mode, open, lease)
      local r = {}
      local forced
      r.strikes, r.within, r.ban, r.factor, r.max_ban, r.forgive, forced, at =
        unpack('<i8i8i8i8i8i8i8', blob, at)
      local flags = { string.byte(blob, at, at + n - 1) }
      at = at + n
      local key = KEYS[k0 + n + (open and 1 or 0) + 1]
      local per = mode >= 4 and 6 or 3
      local rec = load_record(key)
      if rec == nil or now < rec[4] then
        answer(rec == nil and -1 or 0, n, per, rec and rec[4] or 0, lease)
        return skip(at, n, open)
      end
      local status = #out + 1
      at = decide(k0, at, n, mode % 2 == 1, mode >= 4, open, false, lease)
      local struck = forced == 1 and out[status] >= 0
      if out[status] == 0 and mode % 2 == 0 then
        for i = 1, n do
          if flags[i] == 1 and out[status + 1 + per * (i - 1)] == 0 then
            struck = true
          end
        end
      end
      local started, ban_until = false, 0
      if struck then
        started = strike(rec, r)
        set(key, pack('<i8i8i8i8i8', rec[1], rec[2], rec[3], rec[4], rec[5]),
          forget_at(rec, r) - now)
        if started then
          ban_until = rec[4]
          index_ban(KEYS[k0 + n + (open and 1 or 0) + 2], key, ban_until)
        end
      end
      out[#out + 1] = ban_until
      out[#out + 1] = started and 1 or 0
      out[#out + 1] = struck and 1 or 0
      return at
    end

    penalty = penalized
    return penalty
  end
  -- ------------------------------ end of the penalty box ----------------

  general_fns = {
    decide = decide,
    plain = decide_plain,
    rare = rare_fns,
    lease = lease_fns,
    penalty = penalty_fns,
  }
  return general_fns
end

local k0, at = 0, 1
local size = #blob
if fetched then
  -- Every charge a plain lone bucket (script::decide_call): its header and
  -- numbers in one read. The loop below then finds nothing left.
  while at <= size do
    local mode, n, cap, period, cost, reserve, past = unpack('<BHi8i8i8i8', blob, at)
    if mode ~= 0 or n ~= 1 then
      error('a batch read at once holds a charge that is not a plain lone bucket')
    end
    if decide_lone(k0, cap, period, cost, reserve) then
      at = past
    else
      -- decide() reads from past the charge's 3-byte header ('<BH').
      at = general().decide(k0, at + 3, 1, false, false, false, false, nil)
    end
    k0 = k0 + 1
  end
end
while at <= size do
  local mode, n
  mode, n, at = unpack('<BH', blob, at)
  if mode == 0 and n == 1 then
    -- The hot case, with no flag to take apart: a plain lone bucket.
    local cap, period, cost, reserve, past = unpack('<i8i8i8i8', blob, at)
    if decide_lone(k0, cap, period, cost, reserve) then
      at = past
    else
      at = general().decide(k0, at, 1, false, false, false, false, nil)
    end
    k0 = k0 + 1
  elseif mode == 0 and n > 1 then
    -- MGET needs a key: a charge of no bucket goes to decide(), as before.
    local g = general()
    at = g.plain(k0, at, n) or g.decide(k0, at, n, false, false, false, false, nil)
    k0 = k0 + n
  else
    local g = general()
    local lease = nil
    if mode >= 64 then
      mode = mode - 64
      lease, at = g.lease().read(at)
    end
    local pen = mode >= 32
    if pen then
      mode = mode - 32
    end
    local shaped = mode >= 16
    if shaped then
      mode = mode - 16
    end
    local open = mode >= 8
    if open then
      mode = mode - 8
    end
    if lease then
      -- The pool's two keys come after every other key of the charge.
      lease.k = k0 + n + (open and 1 or 0) + (pen and 2 or 0)
    end
    if mode == 2 or mode == 3 then
      at = g.rare().settle(k0, at, n, mode == 3)
      if mode == 3 then
        k0 = k0 + 1
      end
    elseif pen then
      at = g.penalty()(k0, at, n, mode, open, lease)
      if open then
        k0 = k0 + 1
      end
      k0 = k0 + 2
    else
      at = g.decide(k0, at, n, mode % 2 == 1, mode >= 4, open, shaped, lease)
      if open then
        k0 = k0 + 1
      end
    end
    if lease then
      k0 = k0 + 2
    end
    k0 = k0 + n
  end
end
return out
