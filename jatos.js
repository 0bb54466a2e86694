/*
 * jatos.js for jatos-lite: the participant-side API of JATOS 3.10, in one dependency-free file.
 *
 * Study code talks to the server only through the `jatos` object defined here. Data requests
 * (result data, files, study session, log, Ajax end/abort) go through one ordered queue per
 * page: they leave in call order, never overlap, carry a request id the server applies once,
 * are retried while the server is unreachable, and survive a reload of the same run
 * (kept in sessionStorage until acknowledged).
 *
 * Layers, top to bottom; each uses what stands above it:
 *   1. Transport: http() with one timeout and retry policy, the ordered data queue, the
 *      heartbeat, and channel conns (a WebSocket's surface over one long poll per page).
 *      startTransport tells it the run's identity and HTTP settings; it knows nothing else
 *      about studies.
 *   2. Session patches: JSON Pointer and Patch, and the page's copy of a shared session.
 *   3. Channels: openChannel and what keeps a channel open (heartbeat, watchdog, reopening
 *      with backoff). The batch and the group channel are two Channels of different kinds.
 *   4. The jatos.* API.
 * A new jatos.* function goes into layer 4, beside its kin: a few lines that check their
 * arguments and the run's state, then delegate to the layers above.
 */
(function () {
  "use strict";

  var DATA_RETRY_MAX_WAIT = 10000;   // an unreachable server: waits double from jatos.httpRetryWait up to this
  var BACKOFF_MAX_DOUBLINGS = 6;
  var CHANNEL_RETRY_FIRST_WAIT = 500;  // channels.md §7.8: polls and sends wait 0.5, 1, 2, 4, 5, 5 … s
  var CHANNEL_RETRY_MAX_WAIT = 5000;
  var HEARTBEAT_PERIOD = 60000;
  var SENDING_OVERLAY_DELAY = 1000;  // "Sending data. Please wait." only when leaving takes longer
  var TOO_LARGE_OVERLAY_TIME = 8000;
  var RANDOM_ID_BYTES = 16;

  var jatos = {};
  window.jatos = jatos;

  jatos.version = "3.10.5";
  jatos.httpTimeout = 30000;
  jatos.httpRetry = 5;
  jatos.httpRetryWait = 1000;
  jatos.waitSendDataOverlayConfig = { text: "Sending data. Please wait." };
  // Channel timings, used by the batch and group channels.
  jatos.channelSendingTimeoutTime = 10000;
  jatos.channelHeartbeatInterval = 10000;
  jatos.channelHeartbeatTimeoutTime = 10000;
  jatos.channelClosedCheckInterval = 2000;
  jatos.channelOpeningBackoffTimeMin = 1000;
  jatos.channelOpeningBackoffTimeMax = 120000;
  jatos.batchSessionVersioning = true;
  jatos.groupSessionVersioning = true;

  jatos.studyProperties = {};
  jatos.batchProperties = {};
  jatos.componentProperties = {};
  jatos.studyInput = jatos.studyJsonInput = {};
  jatos.batchInput = jatos.batchJsonInput = {};
  jatos.componentInput = jatos.componentJsonInput = {};
  jatos.componentList = [];
  jatos.studyLength = null;
  jatos.componentPos = null;
  jatos.studySessionData = {};
  jatos.urlQueryParameters = {};
  jatos.groupMemberId = null;
  jatos.groupResultId = null;
  jatos.groupMembers = [];
  jatos.groupChannels = [];
  jatos.jQuery = {};

  // ---------------------------------------------------------------------------
  // Helpers: promises as study code expects them (native, plus jQuery's done/fail/always),
  // callbacks that cannot break the caller, ids, waits.
  // ---------------------------------------------------------------------------

  function noop() {}

  function withDeferredMethods(promise) {
    promise.catch(function () { /* a study need not handle every rejection */ });
    promise.done = function (f) { promise.then(f, noop); return promise; };
    promise.fail = function (f) { promise.catch(f); return promise; };
    promise.always = function (f) { promise.then(f, f); return promise; };
    return promise;
  }

  function settled(executor) {
    return withDeferredMethods(new Promise(executor));
  }

  function rejected(message, onError, logger) {
    if (logger) logger.call(console, message);
    call(onError, message);
    return settled(function (resolve, reject) { reject(message); });
  }

  // The promise study code gets for `promise`: its callback first, then the promise, as in JATOS.
  function answered(promise, onSuccess, onError) {
    return settled(function (resolve, reject) {
      promise.then(function (result) {
        call(onSuccess, result);
        resolve(result);
      }, function (reason) {
        call(onError, reason);
        reject(reason);
      });
    });
  }

  // An answer that may never come: succeed/fail settle it (callback first), else the timeout
  // fails it; cleanUp runs once, before the callbacks.
  function pendingAnswer(timeout, timeoutMessage, onSuccess, onFail, cleanUp) {
    var answer = {};
    answer.promise = settled(function (resolve, reject) {
      var timer = setTimeout(function () { answer.fail(timeoutMessage); }, timeout);
      function finish(settle, callback, result) {
        clearTimeout(timer);
        cleanUp();
        call(callback, result);
        settle(result);
      }
      answer.succeed = function (result) { finish(resolve, onSuccess, result); };
      answer.fail = function (result) { finish(reject, onFail, result); };
    });
    return answer;
  }

  // Runs cleanUp when promise settles, before whatever is chained to the result.
  function whenSettled(promise, cleanUp) {
    return promise.then(function (value) {
      cleanUp();
      return value;
    }, function (reason) {
      cleanUp();
      throw reason;
    });
  }

  function call(f) {
    if (typeof f !== "function") return;
    try {
      f.apply(null, Array.prototype.slice.call(arguments, 1));
    } catch (error) {
      setTimeout(function () { throw error; });
    }
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  function backoff(failures, firstWait, maxWait) {
    return Math.min(firstWait * Math.pow(2, Math.min(failures - 1, BACKOFF_MAX_DOUBLINGS)), maxWait);
  }

  function url(relative) {
    return new URL(relative, window.location.href).toString();
  }

  function randomId() {
    var bytes = new Uint8Array(RANDOM_ID_BYTES);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  // ---------------------------------------------------------------------------
  // Transport: HTTP, the data queue (ordered, exactly-once, retried, kept across reloads),
  // the heartbeat, channel conns.
  // ---------------------------------------------------------------------------

  var runId = null;     // whose requests are kept across a reload
  var settings = null;  // gives the current { timeout, retries, wait }

  function startTransport(id, currentSettings) {
    runId = id;
    settings = currentSettings;
    readStored().forEach(function (item) {
      enqueue({ id: item.id, method: item.method, url: item.url, body: item.body });
    });
  }

  // Sends request and resolves with its answer { status, statusText, type, body }, the body read
  // as text (a Blob if request.binary); rejects if the server could not be reached. No answer
  // within settings().timeout (unless policy.untimed) counts as unreachable. A failure is tried
  // again after settings().wait: an unreachable server, and an answer whose status
  // policy.retryStatus accepts, together at most policy.retries times (else settings().retries);
  // with policy.persistent an unreachable server is tried for as long as the page is open, with
  // waits doubling up to DATA_RETRY_MAX_WAIT.
  function http(request, policy) {
    var failures = 0, unanswered = 0;
    function mayRetry() {
      return failures < (policy.retries === undefined ? settings().retries : policy.retries);
    }
    function tryOnce() {
      return exchange(request, !policy.untimed).then(function (answer) {
        if (!policy.retryStatus || !policy.retryStatus(answer.status) || !mayRetry()) return answer;
        failures++;
        return sleep(settings().wait).then(tryOnce);
      }, function (error) {
        if (policy.persistent) return sleep(backoff(++unanswered, settings().wait, DATA_RETRY_MAX_WAIT)).then(tryOnce);
        if (!mayRetry()) throw error;
        failures++;
        return sleep(settings().wait).then(tryOnce);
      });
    }
    return tryOnce();
  }

  function exchange(request, timed) {
    var controller = new AbortController();
    var timer = timed ? setTimeout(function () { controller.abort(); }, settings().timeout) : null;
    return fetch(request.url, {
      method: request.method || "GET", headers: request.headers, body: request.body, credentials: "same-origin",
      signal: controller.signal, cache: "no-store"
    }).then(function (response) {
      return (request.binary ? response.blob() : response.text()).then(function (body) {
        clearTimeout(timer);
        return { status: response.status, statusText: response.statusText,
                 type: response.headers.get("Content-Type") || "", body: body };
      });
    }, function (error) {
      clearTimeout(timer);
      throw error;
    });
  }

  var queue = [];
  var sending = false;
  var requestCount = 0;
  var idleWaiters = [];

  function storageKey() {
    return "jatos-lite:pending:" + runId;
  }

  function readStored() {
    try {
      return JSON.parse(window.sessionStorage.getItem(storageKey()) || "[]");
    } catch (error) {
      return [];
    }
  }

  function writeStored(items) {
    try {
      if (items.length) window.sessionStorage.setItem(storageKey(), JSON.stringify(items));
      else window.sessionStorage.removeItem(storageKey());
    } catch (error) { /* storage full or disabled: the request is still retried in this page */ }
  }

  function remember(request) {
    if (typeof request.body !== "string") return;  // files are retried in-page only
    var stored = readStored();
    stored.push({ id: request.id, method: request.method, url: request.url, body: request.body });
    writeStored(stored);
  }

  function forget(request) {
    writeStored(readStored().filter(function (item) { return item.id !== request.id; }));
  }

  // done(body) or failed(message, status) is called once the request is through.
  function enqueue(request, done, failed) {
    request.id = request.id || randomId();
    requestCount++;
    if (request.persist) remember(request);
    request.done = done;
    request.failed = failed;
    queue.push(request);
    pump();
  }

  function pump() {
    if (sending) return;
    var request = queue.shift();
    if (!request) {
      idleWaiters.splice(0).forEach(function (resolve) { resolve(); });
      return;
    }
    sending = true;
    deliver(request).then(function () {
      sending = false;
      pump();
    });
  }

  function whenIdle() {
    if (!sending && queue.length === 0) return Promise.resolve();
    return new Promise(function (resolve) { idleWaiters.push(resolve); });
  }

  // HTTP errors as in JATOS: 400 and 413 are final, others are tried again (jatos.httpRetry times).
  function deliver(request) {
    var headers = { "X-Requested-With": "XMLHttpRequest", "X-Request-Id": request.id };
    var body = request.body;
    if (typeof body === "string") {
      headers["Content-Type"] = "text/plain; charset=UTF-8";
    } else if (request.blob) {
      body = new FormData();
      body.append("file", request.blob, request.filename);
    }
    return http({ method: request.method, url: request.url, headers: headers, body: body }, {
      persistent: true,
      retryStatus: function (status) { return status !== 200 && status !== 400 && status !== 413; }
    }).then(function (answer) {
      forget(request);
      if (answer.status === 200) return call(request.done, answer.body);
      var details = [answer.status, answer.statusText, answer.body.trim()].filter(Boolean).join(", ");
      call(request.failed, request.method + " to " + request.url + " failed: " + details, answer.status);
    });
  }

  // The heartbeat's code. Its source text runs in a Web Worker, whose timers keep going in
  // background tabs, where page timers are throttled; in the page only where no worker may run.
  function beating(period) {
    var target, timer;
    function beat() {
      fetch(target, { method: "POST", headers: { "Content-Type": "text/plain" } }).catch(function () {}).then(schedule);
    }
    function schedule() {
      clearTimeout(timer);
      timer = setTimeout(beat, period);
    }
    return {
      message: function (message) {
        target = message.url;
        if (message.period) period = message.period;
        if (message.now) beat();
        else schedule();
      },
      stop: function () { clearTimeout(timer); }
    };
  }

  var heartbeat = null;

  function startHeartbeat(target) {
    try {
      var source = "var heart = (" + beating + ")(" + HEARTBEAT_PERIOD + ");" +
        "onmessage = function (e) { heart.message(e.data); };";
      heartbeat = new Worker(URL.createObjectURL(new Blob([source], { type: "text/javascript" })));
    } catch (error) {
      var heart = beating(HEARTBEAT_PERIOD);
      heartbeat = { postMessage: heart.message, terminate: heart.stop };
    }
    heartbeat.postMessage({ url: target, now: true });
  }

  function setHeartbeatPeriod(target, period) {
    if (heartbeat) heartbeat.postMessage({ url: target, period: period });
  }

  function stopHeartbeat() {
    if (heartbeat) heartbeat.terminate();
  }

  // Channel conns: the WebSocket surface (readyState, send, close, on*) over HTTP. One long poll
  // per page carries the events of all its conns.

  var CONNECTING = 0, OPEN = 1, CLOSED = 3;
  var pageId = randomId();
  var pollSockets = {};
  var pollAbort = null;
  var polling = false;
  var pollFailures = 0;
  var pollNumber = 0;

  function postJson(target, body) {
    return fetch(target, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {})
    });
  }

  function connGone(status) {
    return status === 410 || status === 404;
  }

  function PollingSocket(openPath) {
    var socket = this;
    socket.readyState = CONNECTING;
    socket.pending = [];
    socket.sequence = 0;
    socket.sending = false;
    // `page` lets the server tell this page's own reopening from another page taking over the run.
    postJson(url(openPath), { openId: randomId(), page: pageId }).then(function (response) {
      if (response.status !== 200) throw new Error(response.status + " " + response.statusText);
      return response.json();
    }).then(function (opened) {
      if (socket.readyState === CLOSED) return closeConn(opened.conn);  // given up on while it opened
      socket.conn = opened.conn;
      socket.cursor = opened.cursor;
      socket.readyState = OPEN;
      pollSockets[socket.conn] = socket;
      call(socket.onopen);
      opened.events.forEach(function (event) { socket.deliver(event.msg); });
      restartPolling();
    }).catch(function () {
      if (socket.readyState === CLOSED) return;
      socket.readyState = CLOSED;
      call(socket.onerror);
      call(socket.onclose);
    });
  }

  function connUrl(conn) {
    return url("../channels/" + conn + "/");
  }

  function closeConn(conn) {
    fetch(connUrl(conn) + "close", { method: "POST", credentials: "same-origin", keepalive: true }).catch(noop);
  }

  PollingSocket.prototype.base = function () {
    return connUrl(this.conn);
  };

  PollingSocket.prototype.deliver = function (message) {
    if (this.readyState === OPEN) call(this.onmessage, { data: JSON.stringify(message) });
  };

  PollingSocket.prototype.send = function (text) {
    if (this.readyState !== OPEN) throw new Error("Channel is not open");
    var frame = JSON.parse(text);
    if (frame && frame.heartbeat !== undefined) return this.ping();
    this.pending.push(frame);
    this.flush();
  };

  PollingSocket.prototype.ping = function () {
    var socket = this;
    fetch(socket.base() + "ping", { method: "POST", credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 200) socket.deliver({ heartbeat: "pong" });
        else if (connGone(response.status)) socket.lost();
      }, function () { /* no pong: the heartbeat timeout notices */ });
  };

  // Frames leave in order, batched, each batch with the next sequence number; a retry
  // repeats the same number, which the server applies once.
  PollingSocket.prototype.flush = function () {
    var socket = this;
    if (socket.sending || socket.pending.length === 0 || socket.readyState !== OPEN) return;
    socket.sending = true;
    var frames = socket.pending.splice(0);
    var body = { cseq: ++socket.sequence, frames: frames };
    var failures = 0;
    function attemptSend() {
      if (socket.readyState !== OPEN) return;
      postJson(socket.base() + "send", body).then(function (response) {
        if (connGone(response.status)) return socket.lost();
        if (response.status !== 200) throw new Error(String(response.status));
        socket.sending = false;
        socket.flush();
      }).catch(function () {
        setTimeout(attemptSend, backoff(++failures, CHANNEL_RETRY_FIRST_WAIT, CHANNEL_RETRY_MAX_WAIT));
      });
    }
    attemptSend();
  };

  PollingSocket.prototype.lost = function () {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    delete pollSockets[this.conn];
    call(this.onclose);
  };

  PollingSocket.prototype.close = function () {
    if (this.readyState === CLOSED) return;
    var conn = this.conn;
    this.readyState = CLOSED;
    if (conn) {
      delete pollSockets[conn];
      closeConn(conn);
      restartPolling();
    }
    call(this.onclose);
  };

  function restartPolling() {
    if (pollAbort) pollAbort.abort();
    if (!polling) pollLoop();
  }

  function pollLoop() {
    var conns = Object.keys(pollSockets);
    if (conns.length === 0) {
      polling = false;
      return;
    }
    polling = true;
    var controller = new AbortController();
    pollAbort = controller;
    var query = conns.map(function (conn) { return "c=" + conn + ":" + pollSockets[conn].cursor; }).join("&");
    pollNumber++;  // the server orders this page's polls by it: an aborted one may arrive after its successor
    fetch(url("../channels/poll?" + query + "&page=" + pageId + "&n=" + pollNumber), {
      credentials: "same-origin", cache: "no-store", signal: controller.signal
    }).then(function (response) {
      if (response.status !== 200) throw new Error(String(response.status));
      return response.json();
    }).then(function (answer) {
      pollFailures = 0;
      Object.keys(answer).forEach(function (conn) { handlePollAnswer(conn, answer[conn]); });
      // The server could not hold this poll (too many held): ask again a little later.
      if (answer.retryAfter) setTimeout(pollLoop, answer.retryAfter);
      else pollLoop();
    }).catch(function () {
      if (controller.signal.aborted) return pollLoop();
      setTimeout(pollLoop, backoff(++pollFailures, CHANNEL_RETRY_FIRST_WAIT, CHANNEL_RETRY_MAX_WAIT));
    });
  }

  function handlePollAnswer(conn, answer) {
    var socket = pollSockets[conn];
    if (!socket) return;
    if (answer.closed) return socket.lost();
    answer.events.forEach(function (event) {
      if (event.id <= socket.cursor) return;
      socket.cursor = event.id;
      socket.deliver(event.msg);
    });
    socket.cursor = Math.max(socket.cursor, answer.cursor);
  }

  // A closed tab tells the server at once instead of waiting to be found stale.
  window.addEventListener("pagehide", function () {
    Object.keys(pollSockets).forEach(function (conn) {
      if (navigator.sendBeacon) navigator.sendBeacon(connUrl(conn) + "close");
    });
  });

  // ---------------------------------------------------------------------------
  // Session patches: JSON Pointer (RFC 6901), JSON Patch (RFC 6902) and the page's copy of a
  // batch or group session.
  // ---------------------------------------------------------------------------

  function pointerTokens(pointer) {
    if (pointer === "") return [];
    if (pointer.charAt(0) !== "/") throw new Error("Invalid JSON pointer: " + pointer);
    return pointer.substring(1).split("/").map(function (token) {
      return token.replace(/~1/g, "/").replace(/~0/g, "~");
    });
  }

  function getByPointer(document, pointer) {
    var value = document;
    var tokens = pointerTokens(pointer);
    for (var i = 0; i < tokens.length; i++) {
      if (value === null || typeof value !== "object" || !Object.prototype.hasOwnProperty.call(value, tokens[i])) {
        return undefined;
      }
      value = value[tokens[i]];
    }
    return value;
  }

  function clone(value) {
    return value === undefined ? undefined : JSON.parse(JSON.stringify(value));
  }

  function arrayIndex(array, token, forAdd) {
    if (forAdd && token === "-") return array.length;
    if (!/^(0|[1-9][0-9]*)$/.test(token)) throw new Error("Invalid array index " + token);
    var index = parseInt(token, 10);
    if (index > array.length || (!forAdd && index === array.length)) throw new Error("Array index out of range");
    return index;
  }

  // Applies one operation to `document` and returns the new document (the root may change).
  function applyOperation(document, operation) {
    var tokens = pointerTokens(operation.path);
    if (operation.op === "test") {
      if (JSON.stringify(getByPointer(document, operation.path)) !== JSON.stringify(operation.value)) {
        throw new Error("Test failed at " + operation.path);
      }
      return document;
    }
    if (operation.op === "move" || operation.op === "copy") {
      var moved = getByPointer(document, operation.from);
      if (moved === undefined) throw new Error("Missing " + operation.from);
      if (operation.op === "move") document = applyOperation(document, { op: "remove", path: operation.from });
      return applyOperation(document, { op: "add", path: operation.path, value: clone(moved) });
    }
    if (tokens.length === 0) {
      if (operation.op === "remove") return {};
      return clone(operation.value);
    }
    var parent = document;
    tokens.slice(0, -1).forEach(function (token) {
      if (parent === null || typeof parent !== "object" || !Object.prototype.hasOwnProperty.call(parent, token)) {
        throw new Error("Missing parent of " + operation.path);
      }
      parent = parent[token];
    });
    var key = tokens[tokens.length - 1];
    if (parent === null || typeof parent !== "object") throw new Error("Missing parent of " + operation.path);
    if (Array.isArray(parent)) {
      var index = arrayIndex(parent, key, operation.op === "add");
      if (operation.op === "add") parent.splice(index, 0, clone(operation.value));
      else if (operation.op === "remove") parent.splice(index, 1);
      else if (operation.op === "replace") parent[index] = clone(operation.value);
      else throw new Error("Unknown op " + operation.op);
      return document;
    }
    var exists = Object.prototype.hasOwnProperty.call(parent, key);
    if (operation.op === "add") parent[key] = clone(operation.value);
    else if (operation.op === "replace" && exists) parent[key] = clone(operation.value);
    else if (operation.op === "remove" && exists) delete parent[key];
    else throw new Error("Cannot " + operation.op + " " + operation.path);
    return document;
  }

  // JATOS's rule: a patch list starting with "remove /" clears the whole session.
  function applyPatches(document, patches) {
    if (patches.length && patches[0].op === "remove" && patches[0].path === "/") return {};
    return patches.reduce(applyOperation, clone(document) || {});
  }

  function applyPatchesSafely(document, patches) {
    try {
      return applyPatches(document, patches);
    } catch (error) {
      console.error("jatos.js: couldn't apply session patch", error);
      return document;
    }
  }

  function patch(op, path, value, from) {
    var operation = { op: op, path: path };
    if (value !== undefined) operation.value = value;
    if (from !== undefined) operation.from = from;
    return operation;
  }

  // The batch and the group channel carry the same things under different key names (`words`);
  // versioning() says whether the study wants its patches versioned.
  function SharedSession(name, words, versioning) {
    this.name = name;
    this.words = words;
    this.versioning = versioning;
    this.data = {};
    this.version = null;
    this.counter = 0;
    this.waiting = {};
    this.sending = null;
  }

  SharedSession.prototype.reset = function () {
    this.data = {};
    this.version = null;
  };

  SharedSession.prototype.absorb = function (message) {
    if (message[this.words.patches] !== undefined) this.data = applyPatchesSafely(this.data, message[this.words.patches]);
    if (message[this.words.data] !== undefined) this.data = message[this.words.data] === null ? {} : message[this.words.data];
    if (message[this.words.version] !== undefined) this.version = message[this.words.version];
  };

  SharedSession.prototype.settle = function (message) {
    var waiter = this.waiting[message[this.words.id]];
    if (!waiter) return;
    if (message.action === "SESSION_ACK") waiter.succeed("success");
    else waiter.fail(this.name + " session update failed");
  };

  // With versioning, one patch at a time may wait for its answer.
  SharedSession.prototype.busy = function () {
    return this.versioning() && this.sending !== null;
  };

  SharedSession.prototype.send = function (socket, operation, timeout, onSuccess, onFail) {
    var session = this, words = this.words;
    var actionId = session.counter++;
    var message = { action: "SESSION" };
    message[words.id] = actionId;
    message[words.patches] = [operation];
    message[words.version] = session.version;
    message[words.versioning] = !!session.versioning();
    var answer = pendingAnswer(timeout, "Timeout sending session patch", onSuccess, onFail, function () {
      delete session.waiting[actionId];
      if (session.sending === answer.promise) session.sending = null;
    });
    session.waiting[actionId] = answer;
    if (session.versioning()) session.sending = answer.promise;
    socket.send(JSON.stringify(message));
    return answer.promise;
  };

  // ---------------------------------------------------------------------------
  // Channels: a conn carrying one shared session, kept open by a heartbeat and a watchdog and
  // reopened with backoff (channels.md §5).
  // ---------------------------------------------------------------------------

  // Where this page's run stands: no channel opens once it moves on or has become invalid.
  var studyRunInvalid = false;  // the server replaced this run's batch channel: refuse everything
  var startingComponent = false;
  var endingStudy = false;

  function channelRefusal() {
    if (endingStudy || startingComponent) return "study is about to move to the next component or finish";
    if (studyRunInvalid) return "this study run is invalid";
    return null;
  }

  // What a kind of channel gives (the batch and group channel in the jatos.* layer):
  //   path (where it opens), session;
  //   refusalPrefix, openingText (a second open while one is under way), failedText (the open
  //   failed), alreadyOpenText (if an open channel refuses another open);
  //   busy(): whether it may not reopen now; retry(wait): its next attempt after a failed one;
  //   update(message) before the session takes a message, handle(message) after;
  //   pong(), dead() (no pong in time), lost() (the watchdog found it closed), closed().
  function Channel(kind) {
    this.kind = kind;
    this.session = kind.session;
    this.socket = null;
    this.opening = null;
    this.heartbeat = null;
    this.heartbeatTimeouts = [];
    this.watchdog = null;
    this.retryTimer = null;
  }

  function isOpen(channel) {
    return !!channel.socket && channel.socket.readyState === OPEN;
  }

  function openChannel(channel) {
    var kind = channel.kind, refusal = channelRefusal();
    if (refusal) return Promise.reject(kind.refusalPrefix + refusal);
    if (kind.alreadyOpenText && channel.socket && channel.socket.readyState !== CLOSED) {
      return Promise.reject(kind.alreadyOpenText);
    }
    if (channel.opening) return Promise.reject(kind.openingText);
    abandonSocket(channel);
    var opening = channel.opening = new Promise(function (resolve, reject) {
      var socket = channel.socket = new PollingSocket(kind.path);
      // A socket this channel has replaced speaks no more: e.g. the CLOSED the server sends
      // a conn superseded by this page's own reopening must not invalidate the run.
      function current() { return channel.socket === socket; }
      socket.onopen = function () { if (current()) keepOpen(channel, socket); };
      socket.onmessage = function (event) { if (current()) receive(channel, JSON.parse(event.data), resolve); };
      socket.onerror = function () { reject(kind.failedText); };
      socket.onclose = function () {
        if (current()) {
          stopPings(channel);
          channel.session.reset();
          kind.closed();
        }
        reject(channel.session.name + " channel closed");
      };
    });
    opening.then(function () { channel.opening = null; }, function () { channel.opening = null; });
    return opening;
  }

  // A socket still open when the channel opens anew is closed without a word to the channel.
  function abandonSocket(channel) {
    var old = channel.socket;
    channel.socket = null;
    if (old && old.readyState !== CLOSED) old.close();
  }

  // Opens; after a failure, kind.retry tries again after a doubling wait (the first from
  // jatos.channelOpeningBackoffTimeMin, read then) while channels may open.
  // A channel has at most one such retry pending: two would each open a conn.
  function keepOpening(channel, wait) {
    return openChannel(channel).catch(function (reason) {
      wait = wait || jatos.channelOpeningBackoffTimeMin;
      if (wait < jatos.channelOpeningBackoffTimeMax) wait *= 2;
      clearTimeout(channel.retryTimer);
      if (!channelRefusal()) channel.retryTimer = setTimeout(function () { channel.kind.retry(wait); }, wait);
      throw reason;
    });
  }

  // The one way a kept channel opens again (heartbeat, watchdog and retries all come here):
  // it stops what watches the old socket and any retry still pending, so one loop reopens.
  function reopenChannel(channel, wait) {
    if (channel.kind.busy()) return;
    stopKeeping(channel);
    if (channel.socket) channel.socket.close();
    channel.session.reset();
    keepOpening(channel, typeof wait === "number" ? wait : null).catch(noop);
  }

  function receive(channel, message, opened) {
    var kind = channel.kind, session = channel.session;
    if (message.heartbeat !== undefined) {
      heartbeatAnswered(channel);
      return kind.pong();
    }
    kind.update(message);
    session.absorb(message);
    if (message[session.words.version] !== undefined) opened();
    if (message.action === "SESSION_ACK" || message.action === "SESSION_FAIL") session.settle(message);
    kind.handle(message);
  }

  function keepOpen(channel, socket) {
    stopPings(channel);
    channel.heartbeat = setInterval(function () {
      if (socket.readyState !== OPEN) return;
      socket.send('{"heartbeat":"ping"}');
      channel.heartbeatTimeouts.push(setTimeout(function () {
        channel.kind.dead();
        reopenChannel(channel);
      }, jatos.channelHeartbeatTimeoutTime));
    }, jatos.channelHeartbeatInterval);
    clearInterval(channel.watchdog);
    channel.watchdog = setInterval(function () {
      if (socket.readyState === CLOSED) {
        clearInterval(channel.watchdog);
        channel.kind.lost();
        reopenChannel(channel);
      }
    }, jatos.channelClosedCheckInterval);
  }

  function heartbeatAnswered(channel) {
    channel.heartbeatTimeouts.splice(0).forEach(clearTimeout);
  }

  function stopPings(channel) {
    clearInterval(channel.heartbeat);
    heartbeatAnswered(channel);
  }

  function stopKeeping(channel) {
    stopPings(channel);
    clearInterval(channel.watchdog);
    clearTimeout(channel.retryTimer);
  }

  function closeChannel(channel) {
    stopKeeping(channel);
    if (channel.socket) channel.socket.close();
  }

  function announcePatches(patches, callback) {
    (patches || []).forEach(function (operation) { call(callback, operation.path, operation.op); });
  }

  // ---------------------------------------------------------------------------
  // The jatos.* API
  // ---------------------------------------------------------------------------

  // --- the batch channel, opened before jatos.onLoad ---

  var batchAlive = false;
  var onBatchSessionCallback = null;
  var batch = new Channel({
    path: "../batch/open",
    session: new SharedSession("Batch", { id: "id", patches: "patches", data: "data", version: "version",
                                          versioning: "versioning" },
                               function () { return jatos.batchSessionVersioning; }),
    refusalPrefix: "",
    openingText: "Can open only one batch channel.",
    failedText: "Batch channel error",
    alreadyOpenText: null,
    busy: function () { return batch.opening; },
    retry: function (wait) { reopenChannel(batch, wait); },
    update: noop,
    handle: function (message) {
      if (message.action === "SESSION") {
        announcePatches(message.patches, onBatchSessionCallback);
      } else if (message.action === "CLOSED") {
        stopKeeping(batch);
        studyRunInvalid = true;
        jatos.showOverlay({ text: "This study run is invalid.", showImg: false });
      } else if (message.action === "ERROR") {
        console.error(message.errorMsg);
      }
    },
    pong: function () { announceConnection(true); },
    dead: function () { announceConnection(false); },
    lost: noop,
    closed: noop
  });

  function announceConnection(alive) {
    if (batchAlive === alive) return;
    batchAlive = alive;
    window.dispatchEvent(new Event(alive ? "batchChannelAlive" : "batchChannelDead"));
  }

  // --- the group channel, opened by jatos.joinGroup ---

  var groupCallbacks = {};
  var groupLeaving = false, groupReassigning = false, groupFixing = null;
  var onOwnGroupOpened = null;  // set while a reassignment waits for its new group's OPENED
  var group = new Channel({
    path: "../group/join",
    session: new SharedSession("Group", { id: "sessionActionId", patches: "sessionPatches", data: "sessionData",
                                          version: "sessionVersion", versioning: "sessionVersioning" },
                               function () { return jatos.groupSessionVersioning; }),
    refusalPrefix: "Can't join group: ",
    openingText: "Can't join group: joining already",
    failedText: "Couldn't join group",
    alreadyOpenText: "Can't join group: a group channel is already open",
    busy: function () { return group.opening || groupLeaving || groupReassigning || channelRefusal(); },
    retry: function (wait) { reopenChannel(group, wait); },
    update: function (message) {
      if (message.groupResultId !== undefined) {
        jatos.groupResultId = message.groupResultId;
        jatos.groupMemberId = jatos.studyResultId;
      }
      if (message.members !== undefined) jatos.groupMembers = message.members;
      if (message.channels !== undefined) jatos.groupChannels = message.channels;
    },
    handle: handleGroupMessage,
    pong: noop,
    dead: function () { call(groupCallbacks.onError, "Group channel heartbeat fail"); },
    lost: function () { call(groupCallbacks.onError, "Group channel closed"); },
    closed: function () {
      jatos.groupMemberId = null;
      jatos.groupResultId = null;
      jatos.groupMembers = [];
      jatos.groupChannels = [];
      call(groupCallbacks.onClose);
    }
  });

  function handleGroupMessage(message) {
    var self = message.memberId === jatos.groupMemberId;
    switch (message.action) {
      case "OPENED":
        if (!self) memberEvent(groupCallbacks.onMemberOpen, message.memberId);
        else {
          call(groupCallbacks.onOpen, message.memberId);
          if (onOwnGroupOpened) onOwnGroupOpened();
        }
        break;
      case "CLOSED":
        if (message.memberId !== undefined && !self) memberEvent(groupCallbacks.onMemberClose, message.memberId);
        else if (message.memberId === undefined) stopKeeping(group);
        break;
      case "JOINED":
        if (!self) memberEvent(groupCallbacks.onMemberJoin, message.memberId);
        break;
      case "LEFT":
        if (!self) memberEvent(groupCallbacks.onMemberLeave, message.memberId);
        break;
      case "SESSION":
        announcePatches(message.sessionPatches, groupCallbacks.onGroupSession);
        call(groupCallbacks.onUpdate);
        break;
      case "FIXED":
        if (groupFixing) groupFixing.succeed("success");
        call(groupCallbacks.onUpdate);
        break;
      case "ERROR":
        call(groupCallbacks.onError, message.errorMsg);
        break;
    }
    if (message.msg) call(groupCallbacks.onMessage, message.msg);
  }

  function memberEvent(callback, memberId) {
    call(callback, memberId);
    call(groupCallbacks.onUpdate);
  }

  // --- start-up: IDs from the cookie, init data and the batch channel, then jatos.onLoad ---

  var initialized = false;
  var onLoadCallbacks = [];

  function readIdCookie() {
    var row = document.cookie.split("; ").filter(function (entry) {
      return entry.indexOf("JATOS_ID") !== -1 && entry.indexOf(jatos.studyResultUuid) !== -1;
    })[0];
    if (!row) {
      console.error("jatos.js: no JATOS ID cookie for this study run");
      return;
    }
    new URLSearchParams(row.substring(row.indexOf("=") + 1)).forEach(function (value, key) {
      jatos[key] = value;
    });
    jatos.componentPos = parseInt(jatos.componentPos, 10);
  }

  function parsedInput(text, fallback) {
    if (typeof text !== "string") return fallback;
    try {
      return JSON.parse(text);
    } catch (error) {
      console.error("jatos.js: input is not valid JSON", error);
      return fallback;
    }
  }

  function applyInitData(data) {
    jatos.studySessionData = parsedInput(data.studySessionData, {});
    jatos.studyProperties = data.studyProperties;
    jatos.studyInput = jatos.studyJsonInput = parsedInput(data.studyProperties.studyInput, {});
    delete jatos.studyProperties.studyInput;
    jatos.batchProperties = data.batchProperties;
    jatos.batchInput = jatos.batchJsonInput = parsedInput(data.batchProperties.batchInput, null);
    delete jatos.batchProperties.batchInput;
    jatos.componentProperties = data.componentProperties;
    jatos.componentInput = jatos.componentJsonInput = parsedInput(data.componentProperties.componentInput, {});
    delete jatos.componentProperties.componentInput;
    jatos.componentList = data.componentList;
    jatos.studyLength = data.componentList.length;
    jatos.urlQueryParameters = data.urlQueryParameters || {};
    jatos.frameId = jatos.urlQueryParameters.frameId || undefined;
    jatos.studyCode = data.studyCode;
  }

  function loadInitData() {
    return http({ url: url("initData") }, { retryStatus: function (status) { return status !== 200; } })
      .then(function (answer) {
        if (answer.status !== 200) throw new Error("initData answered " + answer.status);
        applyInitData(JSON.parse(answer.body));
      })
      .catch(function (error) { console.error("jatos.js: couldn't load init data", error); });
  }

  function httpSettings() {
    return { timeout: jatos.httpTimeout, retries: jatos.httpRetry, wait: jatos.httpRetryWait };
  }

  function fireOnLoad() {
    // JATOS ships jQuery as jatos.jQuery; we ship none, so studies get the page's own, if any.
    jatos.jQuery = window.jQuery || {};
    initialized = true;
    onLoadCallbacks.splice(0).forEach(function (callback) { call(callback); });
  }

  function init() {
    jatos.studyResultUuid = window.location.pathname.split("/").reverse()[2];
    readIdCookie();
    startHeartbeat(url("../heartbeat"));
    startTransport(jatos.studyResultUuid, httpSettings);
    // The batch channel needs nothing from the init data (its URL holds the run's UUID), so both
    // load together: one round trip before jatos.onLoad, which still waits for an open batch session.
    Promise.all([loadInitData(), keepOpening(batch).catch(noop)])
      .then(showIdOverlay)
      .then(fireOnLoad, fireOnLoad);
  }

  jatos.onLoad = function (callback) {
    if (initialized) call(callback);
    else onLoadCallbacks.push(callback);
  };
  jatos.onload = jatos.onLoad;

  jatos.onError = function () {
    console.warn("jatos.onError is abolished - use the specific function's error callback or Promise function");
  };

  jatos.setHeartbeatPeriod = function (period) {
    if (typeof period === "number") setHeartbeatPeriod(url("../heartbeat"), period);
  };

  jatos.getHttpLoopCounter = function () {
    return requestCount;
  };

  // --- data: result data, files, study session, log ---

  // Every data request: refused once the run is invalid, else queued. A 413 also shows
  // tooLargeText in JATOS's overlay.
  function send(request, onSuccess, onError, tooLargeText) {
    if (studyRunInvalid) return rejected("This study run is invalid.", onError);
    return settled(function (resolve, reject) {
      enqueue(request, function (body) {
        call(onSuccess, body);
        resolve(body);
      }, function (message, status) {
        call(onError, message);
        reject(message);
        if (status === 413 && tooLargeText) {
          jatos.showOverlay({ text: tooLargeText, id: "result413", timeout: TOO_LARGE_OVERLAY_TIME, showImg: false });
        }
      });
    });
  }

  function sendResultData(resultData, append, onSuccess, onError) {
    if (resultData === Object(resultData)) resultData = JSON.stringify(resultData);
    return send({ method: append ? "POST" : "PUT", url: url("resultData"), body: String(resultData), persist: true },
                onSuccess, onError, "Couldn't send result data: too large!");
  }

  jatos.submitResultData = function (resultData, onSuccess, onError) {
    return sendResultData(resultData, false, onSuccess, onError);
  };

  jatos.appendResultData = function (resultData, onSuccess, onError) {
    return sendResultData(resultData, true, onSuccess, onError);
  };

  jatos.uploadResultFile = function (obj, filename, onSuccess, onError) {
    if (typeof filename !== "string" || filename.length === 0) return rejected("No filename specified.", onError);
    var blob;
    if (obj instanceof Blob) blob = obj;
    else if (typeof obj === "string") blob = new Blob([obj], { type: "text/plain" });
    else if (obj === Object(obj)) blob = new Blob([JSON.stringify(obj, null, 2)], { type: "application/json" });
    else return rejected("Only string, Object or Blob allowed.", onError);
    return send({ method: "POST", url: url("files/" + encodeURI(filename)), blob: blob, filename: filename },
                onSuccess, onError, "Couldn't send result file: too large!");
  };

  function readDownload(answer) {
    var type = answer.type.split(";")[0].trim();
    if (type === "application/json") return answer.body.text().then(JSON.parse);
    if (type === "text/plain") return answer.body.text();
    return answer.body;
  }

  jatos.downloadResultFile = function (param1, param2, param3, param4) {
    var componentPos, filename, onSuccess, onError;
    if (typeof param1 === "number") {
      componentPos = param1; filename = param2; onSuccess = param3; onError = param4;
    } else if (typeof param1 === "string") {
      filename = param1; onSuccess = param2; onError = param3;
    } else {
      return rejected("Unknown first parameter.");
    }
    if (typeof filename !== "string" || filename.length === 0) return rejected("No filename specified.", onError);
    var target = url("../files/" + encodeURI(filename));
    if (componentPos) {
      if (componentPos <= 0 || componentPos > jatos.componentList.length) {
        return rejected("Component position does not exist.", onError);
      }
      target += "?componentId=" + jatos.componentList[componentPos - 1].id;
    }
    // Waiting for the queue lets a page download what it has just uploaded.
    return answered(whenIdle().then(function () {
      return http({ url: target, binary: true }, { retries: 0, untimed: true });
    }).then(function (answer) {
      if (answer.status !== 200) throw new Error(answer.statusText || String(answer.status));
      return readDownload(answer);
    }).catch(function (error) {
      throw "Download of " + filename + " returned " + (error && error.message);
    }), onSuccess, onError);
  };

  jatos.setStudySessionData = function (studySessionData, onSuccess, onError) {
    jatos.studySessionData = studySessionData;
    return send({ method: "POST", url: url("../studySessionData"), body: JSON.stringify(studySessionData),
                  persist: true }, onSuccess, onError);
  };

  jatos.log = function (message) {
    return send({ method: "POST", url: url("log"), body: String(message), persist: true });
  };

  jatos.logError = function () {
    console.warn("jatos.logError is abolished - use jatos.log instead");
  };

  jatos.catchAndLogErrors = function () {
    window.addEventListener("error", function (e) {
      jatos.log("Via 'error' event in " + e.filename + ":" + e.lineno + " - " + e.message);
    });
    window.addEventListener("unhandledrejection", function (e) {
      jatos.log("Via 'unhandledrejection' event - " + (e.reason && e.reason.message || e.reason));
    });
    ["error", "warn"].forEach(function (level) {
      var original = console[level];
      console[level] = function (message) {
        jatos.log("Via console." + level + " - " + message);
        original.apply(console, arguments);
      };
    });
  };

  jatos.addJatosIds = function (obj) {
    obj = obj || {};
    obj.studyCode = jatos.studyCode;
    obj.studyId = jatos.studyId;
    obj.studyTitle = jatos.studyProperties.title;
    obj.batchId = jatos.batchId;
    obj.batchTitle = jatos.batchProperties.title;
    obj.componentId = jatos.componentId;
    obj.componentPos = jatos.componentPos;
    obj.componentTitle = jatos.componentProperties.title;
    obj.workerId = jatos.workerId;
    obj.studyResultId = jatos.studyResultId;
    obj.componentResultId = jatos.componentResultId;
    obj.groupResultId = jatos.groupResultId;
    obj.groupMemberId = jatos.groupMemberId;
    return obj;
  };

  // --- batch and group sessions, the batch channel's connection ---

  function sendPatch(channel, operation, onSuccess, onFail) {
    var name = channel.session.name.toLowerCase(), what = name + " session patch";
    // Refusals are logged like JATOS does (studies with catchAndLogErrors send them to the server log).
    if (!isOpen(channel)) {
      return rejected("Can't send " + what + ". No open " + name + " channel.", onFail, console.error);
    }
    if (channel.session.busy()) return rejected("Can send only one " + what + " at a time.", onFail, console.error);
    if (studyRunInvalid) return rejected("Can't send " + what + ". This study run is invalid.", onFail, console.warn);
    return channel.session.send(channel.socket, operation, jatos.channelSendingTimeoutTime, onSuccess, onFail);
  }

  function sessionApi(channel) {
    var api = {};
    var send = function (operation, onSuccess, onFail) { return sendPatch(channel, operation, onSuccess, onFail); };
    var data = function () { return channel.session.data; };
    api.get = function (name) { return clone(getByPointer(data(), "/" + name)); };
    api.getAll = function () { return clone(data()); };
    api.find = function (path) { return clone(getByPointer(data(), path)); };
    api.test = function (path, value) { return getByPointer(data(), path) === value; };
    api.defined = function (path) { return getByPointer(data(), path) !== undefined; };
    api.add = function (path, value, onSuccess, onFail) { return send(patch("add", path, value), onSuccess, onFail); };
    api.set = function (name, value, onSuccess, onFail) { return api.add("/" + name, value, onSuccess, onFail); };
    api.setAll = function (value, onSuccess, onFail) { return api.replace("", value, onSuccess, onFail); };
    api.remove = function (path, onSuccess, onFail) { return send(patch("remove", path), onSuccess, onFail); };
    api.clear = function (onSuccess, onFail) { return send(patch("remove", "/"), onSuccess, onFail); };
    api.replace = function (path, value, onSuccess, onFail) { return send(patch("replace", path, value), onSuccess, onFail); };
    api.copy = function (from, path, onSuccess, onFail) { return send(patch("copy", path, undefined, from), onSuccess, onFail); };
    api.move = function (from, path, onSuccess, onFail) { return send(patch("move", path, undefined, from), onSuccess, onFail); };
    return api;
  }

  jatos.batchSession = sessionApi(batch);
  jatos.groupSession = sessionApi(group);

  jatos.onBatchSession = function (callback) { onBatchSessionCallback = callback; };
  jatos.onConnected = function (callback) { window.addEventListener("batchChannelAlive", callback); };
  jatos.onDisconnected = function (callback) { window.addEventListener("batchChannelDead", callback); };
  jatos.isConnected = function () { return batchAlive; };

  // --- groups ---

  jatos.joinGroup = function (callbacks) {
    groupCallbacks = callbacks || {};
    return withDeferredMethods(openChannel(group).catch(function (reason) {
      call(groupCallbacks.onError, reason);
      throw reason;
    }));
  };

  jatos.sendGroupMsg = function (msg) {
    if (isOpen(group)) group.socket.send(JSON.stringify({ msg: msg }));
  };

  jatos.sendGroupMsgTo = function (recipient, msg) {
    if (isOpen(group)) group.socket.send(JSON.stringify({ recipient: recipient, msg: msg }));
  };

  jatos.setGroupFixed = function (onSuccess, onFail) {
    if (!isOpen(group)) return rejected("Can't fix group. No open group channel.", onFail);
    if (groupFixing) return rejected("Can fix group only once.", onFail);
    if (studyRunInvalid) return rejected("Can't fix group. This study run is invalid.", onFail);
    groupFixing = pendingAnswer(jatos.channelSendingTimeoutTime, "Timeout sending message", onSuccess, onFail,
                                function () { groupFixing = null; });
    var fixed = groupFixing.promise;
    group.socket.send(JSON.stringify({ action: "FIXED" }));
    return fixed;
  };

  jatos.reassignGroup = function (onSuccess, onFail) {
    if (group.opening) return rejected("Can't reassign a group if not joined yet.", onFail);
    if (groupLeaving) return rejected("Can't reassign a group during leaving.", onFail);
    if (groupReassigning) return rejected("Can't reassign a group twice at the same time.", onFail);
    if (!isOpen(group)) return rejected("Can't reassign group. Group channel not open.", onFail);
    if (studyRunInvalid) return rejected("Can't reassign group. This study run is invalid.", onFail);
    groupReassigning = true;
    var oldGroup = jatos.groupResultId;
    return answered(whenSettled(http({ url: url("../group/reassign") }, { retries: 0 }).then(function (answer) {
      // Beyond JATOS: succeed once the channel has brought the new group (its OPENED), so
      // jatos.groupResultId and jatos.groupMembers are the new group's in the callbacks.
      if (answer.status === 200) return newGroupOpened(oldGroup);
      throw answer.status === 204 ? undefined : "Reassign answered " + answer.status;
    }, function (error) {
      throw String(error);
    }), function () { groupReassigning = false; }), onSuccess, onFail);
  };

  // Resolves when this member's OPENED of a group other than oldGroup has arrived (or after
  // channelSendingTimeoutTime, if the channel never brings it).
  function newGroupOpened(oldGroup) {
    return new Promise(function (resolve) {
      var timer = setTimeout(done, jatos.channelSendingTimeoutTime);
      function done() {
        clearTimeout(timer);
        onOwnGroupOpened = null;
        resolve();
      }
      if (jatos.groupResultId !== oldGroup) return done();
      onOwnGroupOpened = function () {
        if (jatos.groupResultId !== oldGroup) done();
      };
    });
  }

  jatos.leaveGroup = function (onSuccess, onError) {
    if (group.opening) return rejected("Can't leave group if not joined yet.", onError);
    if (groupReassigning) return rejected("Can't leave group during reassigning.", onError);
    if (groupLeaving) return rejected("Can leave only once.", onError);
    if (studyRunInvalid) return rejected("Can't leave group. This study run is invalid.", onError);
    groupLeaving = true;
    return answered(whenSettled(http({ url: url("../group/leave") }, { retries: jatos.httpRetry }), function () {
      groupLeaving = false;
    }).then(function (answer) {
      if (answer.status !== 200) throw new Error("Leave answered " + answer.status);
      stopKeeping(group);
      // The server has closed the conn already; close it here too, before the callbacks.
      if (group.socket) group.socket.lost();
    }).catch(function (error) {
      throw String(error);
    }), onSuccess, onError);
  };

  function atMaxActiveMembers(members) {
    var max = jatos.batchProperties && jatos.batchProperties.maxActiveMembers;
    return max !== null && max !== undefined && members.length >= max;
  }

  jatos.hasJoinedGroup = function () { return jatos.groupResultId !== null; };
  jatos.hasOpenGroupChannel = function () { return isOpen(group); };
  jatos.isMaxActiveMemberReached = function () { return atMaxActiveMembers(jatos.groupMembers); };
  jatos.isMaxActiveMemberOpen = function () { return atMaxActiveMembers(jatos.groupChannels); };
  jatos.isGroupOpen = function () {
    return isOpen(group) && jatos.groupMembers.length === jatos.groupChannels.length;
  };

  // --- moving on: other components, end and abort ---

  function showSendingOverlaySoon() {
    return setTimeout(function () { jatos.showOverlay(jatos.waitSendDataOverlayConfig); }, SENDING_OVERLAY_DELAY);
  }

  // Navigate once every queued request is acknowledged.
  function leaveWhenSent(target) {
    var overlay = showSendingOverlaySoon();
    whenIdle().then(function () {
      clearTimeout(overlay);
      allowLeaving();
      window.location.href = target;
    });
  }

  jatos.startComponent = function (componentIdOrUuid, resultData, param3, param4) {
    var message, onError;
    if (typeof param3 === "string") { message = param3; onError = param4; }
    else if (typeof param3 === "function") onError = param3;
    var uuid = componentIdOrUuid;
    if (typeof componentIdOrUuid === "number") {
      var component = jatos.componentList.filter(function (c) { return c.id === componentIdOrUuid; })[0];
      if (!component) return call(onError, "Component with ID " + componentIdOrUuid + " does not exist");
      uuid = component.uuid;
    }
    if (startingComponent) return call(onError, "Can start only one component at the same time");
    if (endingStudy) return call(onError, "Can't start component if study already ended.");
    if (jatos.jatosRun === "RUN_COMPONENT_FINISHED") {
      return resultData ? jatos.endStudy(resultData, true, message) : jatos.endStudy(true, message);
    }
    startingComponent = true;
    if (resultData) jatos.appendResultData(resultData);
    jatos.setStudySessionData(jatos.studySessionData);
    var target = url("../" + uuid + "/start");
    if (message) target += "?" + new URLSearchParams({ message: message }).toString();
    leaveWhenSent(target);
  };

  // startComponentByPos and ByTitle: start `component`, or tell the error callback it is `missing`.
  function startFound(component, missing, resultData, param3, param4) {
    var onError = typeof param3 === "function" ? param3 : (typeof param4 === "function" ? param4 : undefined);
    if (!component) return call(onError, missing);
    jatos.startComponent(component.uuid, resultData, param3, param4);
  }

  jatos.startComponentByPos = function (componentPos, resultData, param3, param4) {
    startFound(jatos.componentList[componentPos - 1], "Component position does not exist", resultData, param3, param4);
  };

  jatos.startComponentByTitle = function (title, resultData, param3, param4) {
    var component = jatos.componentList.filter(function (c) { return c.title === title; })[0];
    startFound(component, "Component with title " + title + " does not exist", resultData, param3, param4);
  };

  function activeComponents() {
    return jatos.componentList.filter(function (c) { return c.active; });
  }

  jatos.startNextComponent = function (resultData, param2, param3) {
    var message = typeof param2 === "string" ? param2 : undefined;
    var next = activeComponents().filter(function (c) { return c.position > jatos.componentPos; })[0];
    if (!next) return resultData ? jatos.endStudy(resultData, true, message) : jatos.endStudy(true, message);
    jatos.startComponent(next.uuid, resultData, param2, param3);
  };

  jatos.startLastComponent = function (resultData, param2, param3) {
    var active = activeComponents();
    if (active.length) jatos.startComponent(active[active.length - 1].uuid, resultData, param2, param3);
  };

  function endUrl(successful, message) {
    var params = new URLSearchParams();
    if (typeof successful === "boolean") params.set("successful", successful);
    if (typeof message === "string") params.set("message", message);
    var query = params.toString();
    return url("../end") + (query ? "?" + query : "");
  }

  function abortUrl(message) {
    return url("../abort") + (typeof message === "string" ? "?" + new URLSearchParams({ message: message }) : "");
  }

  // endStudy* take (resultData, successful, message, ...) or (successful, message, ...).
  function endArguments(args) {
    var list = Array.prototype.slice.call(args);
    var resultData = (typeof list[0] === "string" || typeof list[0] === "object") ? list.shift() : undefined;
    return { resultData: resultData, successful: list[0], message: list[1], rest: list.slice(2) };
  }

  function inJatosFrame() {
    return window.self !== window.top && jatos.workerType === "Jatos" && parent.onIframeComplete;
  }

  // Ending or aborting by Ajax in JATOS's own frame tells the frame once it is done.
  function finishInPlace(finishing) {
    if (inJatosFrame()) finishing.done(function () { parent.onIframeComplete(jatos.frameId, jatos.studyId); });
    return finishing;
  }

  function finishWithoutRedirect(target, onSuccess, onError) {
    if (endingStudy) return rejected("Can end/abort study only once.", onError);
    endingStudy = true;
    allowLeaving();
    var overlay = showSendingOverlaySoon();
    var done = send({ method: "GET", url: target }, onSuccess, onError);
    done.then(stopBackgroundWork, noop).then(function () {
      clearTimeout(overlay);
      jatos.removeOverlays();
    });
    return done;
  }

  function finishAndLeave(target, resultData) {
    if (endingStudy) return console.warn("Can end/abort study only once");
    endingStudy = true;
    if (resultData) jatos.appendResultData(resultData);
    leaveWhenSent(target);
  }

  function redirectAfter(target, finishing) {
    return finishing.done(function () { window.location.href = target; });
  }

  function stopBackgroundWork() {
    stopHeartbeat();
    closeChannel(batch);
    closeChannel(group);
  }

  jatos.endStudyWithoutRedirect = function () {
    var a = endArguments(arguments);
    if (a.resultData && !endingStudy) jatos.appendResultData(a.resultData);
    return finishWithoutRedirect(endUrl(a.successful, a.message), a.rest[0], a.rest[1]);
  };
  jatos.endStudyAjax = jatos.endStudyWithoutRedirect;

  jatos.endStudyAndRedirect = function (target) {
    return redirectAfter(target, jatos.endStudyWithoutRedirect.apply(null, Array.prototype.slice.call(arguments, 1)));
  };

  jatos.endStudy = function () {
    var a = endArguments(arguments);
    var showEndPage = a.rest[0];
    if ((typeof showEndPage !== "undefined" && !showEndPage) || inJatosFrame()) {
      var args = a.resultData ? [a.resultData, a.successful, a.message] : [a.successful, a.message];
      return finishInPlace(jatos.endStudyWithoutRedirect.apply(null, args));
    }
    finishAndLeave(endUrl(a.successful, a.message), a.resultData);
  };

  jatos.abortStudyWithoutRedirect = function (message, onSuccess, onError) {
    return finishWithoutRedirect(abortUrl(message), onSuccess, onError);
  };
  jatos.abortStudyAjax = jatos.abortStudyWithoutRedirect;

  jatos.abortStudyAndRedirect = function (target, message, onSuccess, onError) {
    return redirectAfter(target, jatos.abortStudyWithoutRedirect(message, onSuccess, onError));
  };

  jatos.abortStudy = function (message, showEndPage) {
    if (showEndPage === false || inJatosFrame()) return finishInPlace(jatos.abortStudyWithoutRedirect(message));
    finishAndLeave(abortUrl(message));
  };

  // --- page furniture: overlays, abort button, the reload warning ---

  var OVERLAY_STYLE = "color:black;font-family:sans-serif;font-size:30px;letter-spacing:2px;opacity:0.8;" +
    "text-shadow:-1px 0 white,0 1px white,1px 0 white,0 -1px white;z-index:9999;position:fixed;left:50%;top:50%;" +
    "transform:translate(-50%,-50%);display:flex;align-items:center;justify-content:center;flex-direction:column;" +
    "text-align:center;";
  var SPINNER_STYLE = "width:32px;height:32px;margin-top:10px;border:4px solid #bbb;border-top-color:#333;" +
    "border-radius:50%;animation:jatosSpin 1s linear infinite;";

  function ensureSpinnerAnimation() {
    if (document.getElementById("jatosSpinStyle")) return;
    var style = document.createElement("style");
    style.id = "jatosSpinStyle";
    style.textContent = "@keyframes jatosSpin{to{transform:rotate(360deg)}}";
    document.head.appendChild(style);
  }

  jatos.showOverlay = function (config) {
    config = config || {};
    if (config.show === false) return;
    if (typeof config.id === "string" && document.getElementById(config.id)) {
      var existing = document.getElementById(config.id);
      if (config.text) existing.firstChild.textContent = config.text;
      return existing;
    }
    var div = document.createElement("div");
    div.style.cssText = OVERLAY_STYLE + (typeof config.style === "string" ? ";" + config.style : "");
    if (typeof config.id === "string") div.id = config.id;
    div.classList.add("jatosOverlay");
    if (typeof config.className === "string") div.classList.add(config.className);
    var text = document.createElement("span");
    text.textContent = typeof config.text === "string" ? config.text : "Please wait";
    div.appendChild(text);
    if (config.showImg !== false) {
      var image;
      if (typeof config.imgUrl === "string") {
        image = document.createElement("img");
        image.src = config.imgUrl;
        image.style.marginTop = "10px";
      } else {
        ensureSpinnerAnimation();
        image = document.createElement("div");
        image.style.cssText = SPINNER_STYLE;
      }
      div.appendChild(image);
    }
    div.setAttribute("data-keep", config.keep === true ? "true" : "false");
    if (typeof config.timeout === "number") setTimeout(function () { div.remove(); }, config.timeout);
    document.body.appendChild(div);
    return div;
  };

  jatos.removeOverlays = function (force) {
    document.querySelectorAll(".jatosOverlay").forEach(function (element) {
      if (force || element.getAttribute("data-keep") !== "true") element.remove();
    });
  };
  jatos.removeOverlay = function () { jatos.removeOverlays(); };

  function showIdOverlay() {
    if (jatos.workerType !== "Jatos") return;
    var ids = [];
    if (jatos.frameId) ids.push("frame: " + jatos.frameId);
    if (jatos.workerId) ids.push("worker: " + jatos.workerId);
    if (jatos.studyResultId) ids.push("study result: " + jatos.studyResultId);
    jatos.showOverlay({
      id: "idOverlay", text: ids.join("\n"), keep: true, showImg: false,
      style: "top:unset;left:4px;bottom:4px;transform:unset;font-size:10px;letter-spacing:normal;" +
        "white-space:pre;text-align:left;"
    });
  }

  jatos.addAbortButton = function (config) {
    config = config || {};
    var button = document.createElement("div");
    button.textContent = typeof config.text === "string" ? config.text : "Cancel";
    button.title = typeof config.tooltip === "string" ? config.tooltip
      : "Cancels this study and deletes all already submitted data";
    button.style.cssText = "color:black;font-family:sans-serif;font-size:20px;letter-spacing:2px;position:fixed;" +
      "bottom:1em;right:1em;opacity:0.6;z-index:9999;cursor:pointer;" +
      "text-shadow:-1px 0 white,0 1px white,1px 0 white,0 -1px white;" +
      (typeof config.style === "string" ? ";" + config.style : "");
    var confirmFirst = typeof config.confirm === "boolean" ? config.confirm : true;
    var confirmText = typeof config.confirmText === "string" ? config.confirmText
      : "Do you really want to cancel this study?";
    var message = typeof config.msg === "string" ? config.msg : "Worker decided to abort";
    button.addEventListener("click", function () {
      if (confirmFirst && !window.confirm(confirmText)) return;
      if (typeof config.action === "function") config.action(message);
      else jatos.abortStudy(message);
    });
    document.body.appendChild(button);
    return button;
  };

  var warnBeforeUnload = true;

  function beforeUnloadWarning(event) {
    event.preventDefault();
    event.returnValue = "Are you sure you want to leave?";
  }

  function allowLeaving() {
    window.removeEventListener("beforeunload", beforeUnloadWarning, { capture: true });
  }

  jatos.showBeforeUnloadWarning = function (show) {
    warnBeforeUnload = !!show;
    if (warnBeforeUnload) window.addEventListener("beforeunload", beforeUnloadWarning, { capture: true });
    else allowLeaving();
  };

  // A page that may not be reloaded warns before the participant leaves it by accident.
  jatos.onLoad(function () {
    if (warnBeforeUnload && !jatos.componentProperties.reloadable) jatos.showBeforeUnloadWarning(true);
  });

  init();
})();
