/*! Hydra Site Activity widget script. Readable source: widget/static/hydra.js (minified at serve time). */
(function (window, document) {
  'use strict';

  var ENDPOINT_PATH = '/api/widget/track';
  var FLUSH_MS = 5000; // spec: flush every 5 s ...
  var FLUSH_COUNT = 25; // ... or as soon as 25 events are queued
  var MAX_NAME_CHARS = 100; // the server counts code points, so do we
  var MAX_PROPS_BYTES = 4096; // UTF-8 bytes of the JSON, like the server
  var MAX_USER_ID_CHARS = 255;
  var MAX_URL_CHARS = 2048; // longer URLs are cut rather than losing the pageview to a 400
  var MAX_EVENTS_PER_REQUEST = 100; // the server rejects larger requests
  // Browsers cap the bodies of all in-flight keepalive requests of a page at 64 KB; stay under it.
  var MAX_INFLIGHT_BYTES = 60000;
  var ENVELOPE_BYTES = 300; // widget_id, visitor_id, sent_at and punctuation, generously
  var STORED_CAP = 500; // unsent events kept in localStorage; the oldest are dropped beyond this
  var BACKOFF_MIN_MS = 1000;
  var BACKOFF_MAX_MS = 60000;
  var VID_KEY = 'hydra_vid';
  // identify() ids that are a bug in the caller's code, not a user (compared trimmed and lowercased);
  // the API refuses the same list, so such an id never merges strangers into one contact.
  // The API's list (producer_api.validation.PLACEHOLDER_USER_IDS; tests/test_widget.py keeps them equal).
  var PLACEHOLDER_IDS = ['', 'undefined', 'null', 'none', 'nil', 'nan', '0', '-1', 'true', 'false',
    '[object object]', 'anonymous', 'guest', 'unknown', 'not_authenticated', 'id', 'user_id', 'userid', 'email',
    '00000000-0000-0000-0000-000000000000'];

  var existing = window.hydra;
  if (existing && existing._loaded) return; // the script was included twice: the first copy wins

  function warn(message) {
    try { console.warn('[hydra] ' + message); } catch (e) { /* no console: nothing to do */ }
  }

  // Public entry points run inside the host page's code: an error here must never become theirs.
  function guarded(fn) {
    return function () {
      try { return fn.apply(null, arguments); } catch (e) { warn('internal error: ' + e); }
    };
  }

  // --- where to send ---------------------------------------------------------------------------
  function findScript() {
    if (document.currentScript) return document.currentScript;
    // currentScript is null when we run from a callback; the last matching tag is then our best guess.
    var scripts = document.getElementsByTagName('script');
    for (var i = scripts.length - 1; i >= 0; i--) {
      if (/\/widget\.js(\?|#|$)/.test(scripts[i].src)) return scripts[i];
    }
    return null;
  }


  // --- ids and time ------------------------------------------------------------------------------
  function uuid() {
    var c = window.crypto;
    if (c.randomUUID) return c.randomUUID();
    // randomUUID exists only in secure contexts (https, localhost); getRandomValues works everywhere.
    var b = c.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64; // version 4
    b[8] = (b[8] & 63) | 128; // RFC 4122 variant
    var h = '';
    for (var i = 0; i < 16; i++) h += (b[i] + 256).toString(16).slice(1);
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }

  // Strictly increasing millisecond clock: calls made in the same millisecond keep their call order
  // in occurred_at (the server's skew correction preserves differences, so the order survives).
  var lastMs = 0;
  function now() {
    lastMs = Math.max(Date.now(), lastMs + 1);
    return new Date(lastMs).toISOString();
  }

  function chars(text) {
    return Array.from(text).length; // code points, like Python's len() on the server
  }

  function clip(text) {
    return chars(text) > MAX_URL_CHARS ? Array.from(text).slice(0, MAX_URL_CHARS).join('') : text;
  }

  // A URL as we store it: never its fragment, which often carries secrets (OAuth tokens in #access_token=…).
  function noHash(url) {
    return clip(String(url || '').split('#')[0]);
  }

  function utf8Bytes(text) {
    return new TextEncoder().encode(text).length;
  }

  // --- storage: the page origin's localStorage, or nothing (blocked, private mode) --------------------
  // Reading and writing fail independently: a full storage (quota) still reads, so writes are best effort
  // and never make us forget what can be read.
  function openStorage() {
    try {
      var s = window.localStorage;
      s.getItem(VID_KEY);
      return s;
    } catch (e) {
      return null;
    }
  }

  function load(key) {
    try { return storage && storage.getItem(key); } catch (e) { return null; }
  }

  // Returns whether the value was stored.
  function save(key, value) {
    try { storage.setItem(key, value); return true; } catch (e) { return false; /* full or blocked: memory */ }
  }

  // The anonymous visitor id is per origin (localStorage is); without storage it lives as long as the page.
  // A value that is not one of our UUIDs (edited, or written by other code) would get every request rejected.
  // A new id is minted only when none can be read.
  function loadVisitorId() {
    var id = load(VID_KEY);
    if (/^[0-9a-f-]{36}$/.test(id || '')) return id;
    id = uuid();
    save(VID_KEY, id);
    return id;
  }

  // --- the queue -------------------------------------------------------------------------------
  // q holds the events this page sends and the server has not answered yet, oldest first, mirrored to
  // localStorage so a navigation or a closed tab does not lose them. Each page writes only its own key
  // ('hydra_q_' + widget + ':' + a page id): the tabs of an origin run in separate processes, where a
  // read-modify-write of one shared key can read another tab's write late and erase it. At load a page
  // adopts the keys other pages left (closed before their events were answered), sends those events and
  // removes the keys once its own holds them. A tab still open whose key was adopted sends its events too:
  // twice is harmless, the pipeline keeps one row per event id. `busy` marks events in a request.
  function readQueue(key) {
    try {
      var value = JSON.parse(load(key) || '[]');
      return Array.isArray(value) ? value : [];
    } catch (e) {
      return []; // not ours to read (edited, or written by other code)
    }
  }

  var busy = {};
  var inflightBytes = 0;
  var timer = 0;
  var retryAt = 0;
  var backoff = BACKOFF_MIN_MS;

  // Returns whether the queue is stored (an empty queue leaves no key behind).
  function persist() {
    if (q.length) return save(queueKey, JSON.stringify(q));
    try { storage.removeItem(queueKey); } catch (e) { /* blocked: nothing was stored */ }
    return false;
  }

  // The keys of this widget's queues left by other pages (and the single shared key of older versions).
  function adoptQueues(legacyKey) {
    var keys = [];
    try {
      for (var i = 0; i < storage.length; i++) {
        var key = storage.key(i);
        if (key === legacyKey || key.indexOf(legacyKey + ':') === 0) keys.push(key);
      }
    } catch (e) {
      return; // blocked: nothing to adopt
    }
    var have = {};
    keys.forEach(function (key) {
      readQueue(key).forEach(function (e) {
        if (!e || !e.event_id || have[e.event_id]) return; // a copy adopted already, or not our event
        have[e.event_id] = 1;
        q.push(e);
      });
    });
    if (q.length > STORED_CAP) q.splice(0, q.length - STORED_CAP);
    if (!q.length || persist()) keys.forEach(function (key) { storage.removeItem(key); });
  }

  function unsentCount() {
    var n = 0;
    for (var i = 0; i < q.length; i++) if (!busy[q[i].event_id]) n++;
    return n;
  }

  function arm(ms) {
    clearTimeout(timer);
    timer = setTimeout(guarded(flush), ms);
  }

  function enqueue(event) {
    event.event_id = uuid();
    event.occurred_at = now();
    event.url = noHash(location.href);
    q.push(event);
    if (q.length > STORED_CAP) q.splice(0, q.length - STORED_CAP);
    persist();
    schedule();
  }

  // A hidden page may be discarded without another event, and after pagehide no timer may ever fire:
  // then whatever is queued goes out at once.
  var leaving = false;
  function schedule() {
    var n = unsentCount();
    if (n && (leaving || document.visibilityState === 'hidden')) flush(true);
    else if (n >= FLUSH_COUNT) flush();
    else if (n && !timer) arm(FLUSH_MS);
  }

  // Sends every unsent event in requests of at most 100 events, keeping the bytes of all in-flight
  // requests under the keepalive limit; what does not fit waits until a pending request is answered.
  // `urgent` (the page is going away) ignores the retry backoff: there may be no later chance.
  function flush(urgent) {
    clearTimeout(timer);
    timer = 0;
    var wait = retryAt - Date.now();
    if (wait > 0 && urgent !== true) return arm(wait);
    var pending = q.filter(function (e) { return !busy[e.event_id]; });
    var chunk = [];
    var bytes = ENVELOPE_BYTES;
    for (var i = 0; i < pending.length; i++) {
      var size = utf8Bytes(JSON.stringify(pending[i])) + 1;
      if (chunk.length === MAX_EVENTS_PER_REQUEST || inflightBytes + bytes + size > MAX_INFLIGHT_BYTES) {
        if (chunk.length) send(chunk, bytes);
        chunk = [];
        bytes = ENVELOPE_BYTES;
        if (inflightBytes + bytes + size > MAX_INFLIGHT_BYTES) break;
      }
      chunk.push(pending[i]);
      bytes += size;
    }
    if (chunk.length) send(chunk, bytes);
  }

  function send(events, bytes) {
    var ids = events.map(function (e) { return e.event_id; });
    ids.forEach(function (id) { busy[id] = 1; });
    inflightBytes += bytes;
    var body = JSON.stringify({ widget_id: widgetId, visitor_id: visitorId, sent_at: now(), events: events });

    function done(delivered) {
      inflightBytes -= bytes;
      ids.forEach(function (id) { delete busy[id]; });
      if (delivered) {
        // 2xx, or a 4xx: the server kept the valid events of the request and retrying cannot fix the rest.
        q = q.filter(function (e) { return ids.indexOf(e.event_id) < 0; });
        persist();
        backoff = BACKOFF_MIN_MS;
        retryAt = 0;
        schedule();
      } else {
        // Full jitter over the upper half, so many clients do not retry in lockstep after an outage.
        var delay = backoff / 2 + Math.random() * backoff / 2;
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
        retryAt = Date.now() + delay;
        arm(delay);
      }
    }

    // text/plain keeps this a CORS "simple" request (no preflight); keepalive lets it outlive the page.
    fetch(endpoint, {
      method: 'POST',
      body: body,
      keepalive: true,
      credentials: 'omit',
      headers: { 'Content-Type': 'text/plain' }
    }).then(function (res) {
      // Until its body is read, a finished request still counts against the 64 KB keepalive quota.
      var status = function () { return res.status; };
      return res.text().then(status, status);
    }).then(function (status) {
      done(status < 500 && status !== 429);
    }, function () {
      done(false);
    }).catch(function () { /* never surface as an unhandled rejection in the host page */ });
  }

  // --- what gets tracked -------------------------------------------------------------------------
  function isPlainObject(value) {
    if (Object.prototype.toString.call(value) !== '[object Object]') return false;
    var proto = Object.getPrototypeOf(value);
    return proto === Object.prototype || proto === null;
  }

  // Returns the JSON-ready object, or undefined after warning why it cannot be sent.
  function checkObject(value, what) {
    if (value === undefined || value === null) return {};
    if (!isPlainObject(value)) return warn(what + ' must be a plain object; call dropped');
    var json;
    try { json = JSON.stringify(value); } catch (e) { return warn(what + ' is not serialisable (' + e + '); call dropped'); }
    if (utf8Bytes(json) > MAX_PROPS_BYTES) return warn(what + ' exceed ' + MAX_PROPS_BYTES + ' bytes as JSON; call dropped');
    return JSON.parse(json); // a snapshot: later changes by the caller do not leak into the queue
  }

  function track(name, properties) {
    if (typeof name !== 'string' || !name) return warn('track: event name must be a non-empty string; call dropped');
    if (chars(name) > MAX_NAME_CHARS) return warn('track: event name exceeds ' + MAX_NAME_CHARS + ' characters; call dropped');
    var props = checkObject(properties, 'track: properties');
    if (props) enqueue({ type: 'custom', name: name, properties: props });
  }

  function identify(userId, traits) {
    if (typeof userId === 'number' && isFinite(userId)) userId = String(userId);
    if (typeof userId !== 'string' || !userId) return warn('identify: userId must be a non-empty string; call dropped');
    if (PLACEHOLDER_IDS.indexOf(userId.trim().toLowerCase()) >= 0) {
      return warn('identify: "' + userId + '" is a placeholder, not a user id; call dropped');
    }
    if (chars(userId) > MAX_USER_ID_CHARS) return warn('identify: userId exceeds ' + MAX_USER_ID_CHARS + ' characters; call dropped');
    var checked = checkObject(traits, 'identify: traits');
    if (checked) enqueue({ type: 'identify', user_id: userId, traits: checked });
  }

  // Route changes are compared without the hash: jumping to an in-page anchor is not a new page.
  var lastPage = null;

  function pageview(referrer) {
    if (noHash(location.href) === lastPage) return; // e.g. pushState to the same URL, or a popstate to a hash
    lastPage = noHash(location.href);
    var event = { type: 'pageview' };
    if (referrer) event.referrer = noHash(referrer);
    enqueue(event);
  }

  // SPA navigations: the page we come from is the referrer, as it would be for a full page load.
  // popstate fires after location changed, so the URL we were on is remembered here. `tidy`: the URL
  // changed within the same page (replaceState keeping the path, e.g. dropping utm_* or a search box's
  // ?q=): no pageview, and later events and the next referrer carry the tidied URL.
  var currentUrl;
  var routeChanged = guarded(function (tidy) {
    var from = currentUrl;
    currentUrl = location.href;
    if (tidy) lastPage = noHash(currentUrl);
    else pageview(from);
  });

  function hookHistory(method) {
    var original = history[method];
    if (typeof original !== 'function') return;
    history[method] = function () {
      var path = location.pathname;
      var result = original.apply(this, arguments); // the host's own errors propagate untouched
      routeChanged(method === 'replaceState' && location.pathname === path);
      return result;
    };
  }

  // --- start -----------------------------------------------------------------------------------
  // Set by start(): where to send, as whom, and what is still unsent.
  var widgetId, endpoint, storage, visitorId, queueKey, q;

  function start() {
    var script = findScript();
    widgetId = script && script.getAttribute('data-widget-id');
    if (!widgetId) return warn('no data-widget-id on the widget.js script tag; tracking is off');
    var apiHost = script.getAttribute('data-api-host') || new URL(script.src, location.href).origin;
    endpoint = apiHost.replace(/\/+$/, '') + ENDPOINT_PATH;
    storage = openStorage();
    visitorId = loadVisitorId();
    queueKey = 'hydra_q_' + widgetId + ':' + uuid();
    q = [];
    adoptQueues('hydra_q_' + widgetId);

    var api = { track: guarded(track), identify: guarded(identify), _loaded: true };
    var queued = existing && Array.isArray(existing._q) ? existing._q : [];
    window.hydra = api;

    currentUrl = location.href;
    pageview(document.referrer);
    hookHistory('pushState');
    hookHistory('replaceState');
    window.addEventListener('popstate', function () { routeChanged(); });

    // Calls buffered by the pre-load snippet replay in order, after the pageview of this page load.
    queued.forEach(function (call) {
      var fn = call && api.hasOwnProperty(call[0]) && api[call[0]];
      if (typeof fn === 'function') fn.apply(null, Array.prototype.slice.call(call[1] || []));
    });

    // The page may never come back: send what is queued while the browser still lets us.
    var leave = guarded(function () { flush(true); });
    window.addEventListener('pagehide', function () {
      leaving = true;
      leave();
    });
    document.addEventListener('visibilitychange', function () {
      if (document.visibilityState === 'hidden') leave();
    });
    // A page loaded meanwhile adopted our key: store our queue again, it may have read an older version.
    window.addEventListener('storage', guarded(function (e) {
      if (e.key === queueKey && e.newValue === null) persist();
    }));
    // A page restored from the back/forward cache is a new view of it without a new load.
    window.addEventListener('pageshow', guarded(function (e) {
      leaving = false;
      if (e.persisted) {
        lastPage = null;
        pageview(document.referrer);
      }
    }));
  }

  guarded(start)();
})(window, document);
