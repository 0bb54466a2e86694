/*
 * jatos.js for jatos-lite: the participant-side API of JATOS 3.10, in one dependency-free file.
 *
 * Study code talks to the server only through the `jatos` object defined here. Data requests
 * (result data, files, study session, log, Ajax end/abort) go through one ordered queue per
 * page: they leave in call order, never overlap, carry a request id the server applies once,
 * are retried while the server is unreachable, and survive a reload of the same run
 * (kept in sessionStorage until acknowledged).
 */
(function () {
  "use strict";

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
  // Promises as study code expects them: native, plus jQuery's done/fail/always.
  // ---------------------------------------------------------------------------

  function withDeferredMethods(promise) {
    promise.catch(function () { /* a study need not handle every rejection */ });
    promise.done = function (f) { promise.then(f, function () {}); return promise; };
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

  function url(relative) {
    return new URL(relative, window.location.href).toString();
  }

  function randomId() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  // ---------------------------------------------------------------------------
  // The request queue: ordered, exactly-once, retried, kept across reloads.
  // ---------------------------------------------------------------------------

  var studyRunInvalid = false;  // the server replaced this run's batch channel: refuse everything
  var queue = [];
  var sending = false;
  var requestCounter = 0;
  var idleWaiters = [];

  function storageKey() {
    return "jatos-lite:pending:" + jatos.studyResultUuid;
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

  function enqueue(request, onSuccess, onError) {
    if (studyRunInvalid) return rejected("This study run is invalid.", onError);
    request.id = request.id || randomId();
    requestCounter++;
    if (request.persist) remember(request);
    return settled(function (resolve, reject) {
      request.resolve = function (body) { call(onSuccess, body); resolve(body); };
      request.reject = function (message, status) {
        call(onError, message);
        reject(message);
        if (request.onFinalStatus) request.onFinalStatus(status);
      };
      queue.push(request);
      pump();
    });
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

  function attempt(request) {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, jatos.httpTimeout);
    var headers = { "X-Requested-With": "XMLHttpRequest", "X-Request-Id": request.id };
    var body = request.body;
    if (typeof body === "string") {
      headers["Content-Type"] = "text/plain; charset=UTF-8";
    } else if (request.blob) {
      body = new FormData();
      body.append("file", request.blob, request.filename);
    }
    return fetch(request.url, {
      method: request.method, headers: headers, body: body, credentials: "same-origin",
      signal: controller.signal, cache: "no-store"
    }).then(function (response) {
      return response.text().then(function (text) {
        clearTimeout(timer);
        return { status: response.status, statusText: response.statusText, text: text };
      });
    }, function (error) {
      clearTimeout(timer);
      throw error;
    });
  }

  // Network failures and timeouts are retried for as long as the page is open (with backoff);
  // HTTP errors as in JATOS: 400 and 413 are final, others are retried jatos.httpRetry times.
  function deliver(request) {
    var httpFailures = 0, networkFailures = 0;
    function tryOnce() {
      return attempt(request).then(function (response) {
        if (response.status === 200) {
          forget(request);
          request.resolve(response.text);
          return;
        }
        if (response.status !== 400 && response.status !== 413 && httpFailures < jatos.httpRetry) {
          httpFailures++;
          return sleep(jatos.httpRetryWait).then(tryOnce);
        }
        forget(request);
        var details = [response.status, response.statusText, response.text.trim()].filter(Boolean).join(", ");
        request.reject(request.method + " to " + request.url + " failed: " + details, response.status);
      }, function () {
        networkFailures++;
        var wait = Math.min(jatos.httpRetryWait * Math.pow(2, Math.min(networkFailures - 1, 6)), 10000);
        return sleep(wait).then(tryOnce);
      });
    }
    return tryOnce();
  }

  function resendStoredRequests() {
    readStored().forEach(function (item) {
      enqueue({ id: item.id, method: item.method, url: item.url, body: item.body });
    });
  }

  // ---------------------------------------------------------------------------
  // Start-up: IDs from the cookie, init data, heartbeat, then jatos.onLoad.
  // ---------------------------------------------------------------------------

  var initialized = false;
  var onLoadCallbacks = [];
  var startingComponent = false;
  var endingStudy = false;
  var heartbeat = null;

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

  function fetchInitData() {
    var failures = 0;
    function tryOnce() {
      var controller = new AbortController();
      var timer = setTimeout(function () { controller.abort(); }, jatos.httpTimeout);
      return fetch(url("initData"), { credentials: "same-origin", cache: "no-store", signal: controller.signal })
        .then(function (response) {
          clearTimeout(timer);
          if (response.status !== 200) throw new Error("initData answered " + response.status);
          return response.json();
        })
        .then(applyInitData)
        .catch(function (error) {
          clearTimeout(timer);
          if (++failures > jatos.httpRetry) {
            console.error("jatos.js: couldn't load init data", error);
            return;
          }
          return sleep(jatos.httpRetryWait).then(tryOnce);
        });
    }
    return tryOnce();
  }

  var HEARTBEAT_WORKER =
    "var target, period = 60000, timer;" +
    "function beat() { fetch(target, { method: 'POST', headers: { 'Content-Type': 'text/plain' } })" +
    "  .catch(function () {}).then(schedule); }" +
    "function schedule() { clearTimeout(timer); timer = setTimeout(beat, period); }" +
    "onmessage = function (e) { target = e.data.url; if (e.data.period) period = e.data.period;" +
    "  if (e.data.now) beat(); else schedule(); };";

  // A Web Worker keeps beating in background tabs, where page timers are throttled.
  function startHeartbeat() {
    var target = url("../heartbeat");
    try {
      heartbeat = new Worker(URL.createObjectURL(new Blob([HEARTBEAT_WORKER], { type: "text/javascript" })));
      heartbeat.postMessage({ url: target, now: true });
    } catch (error) {
      var period = 60000;
      var beat = function () {
        fetch(target, { method: "POST", headers: { "Content-Type": "text/plain" } }).catch(function () {})
          .then(function () { heartbeat.timer = setTimeout(beat, period); });
      };
      heartbeat = {
        timer: null,
        postMessage: function (message) {
          clearTimeout(heartbeat.timer);
          if (message.period) period = message.period;
          heartbeat.timer = setTimeout(beat, message.now ? 0 : period);
        },
        terminate: function () { clearTimeout(heartbeat.timer); }
      };
      beat();
    }
  }

  function stopBackgroundWork() {
    if (heartbeat) heartbeat.terminate();
    closeChannels();
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
    startHeartbeat();
    resendStoredRequests();
    fetchInitData()
      .then(function () { return openBatchChannelWithRetry().catch(function () {}); })
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
    if (typeof period === "number" && heartbeat) heartbeat.postMessage({ url: url("../heartbeat"), period: period });
  };

  jatos.getHttpLoopCounter = function () {
    return requestCounter;
  };

  // ---------------------------------------------------------------------------
  // Data: result data, files, study session, log.
  // ---------------------------------------------------------------------------

  function sendResultData(resultData, append, onSuccess, onError) {
    if (resultData === Object(resultData)) resultData = JSON.stringify(resultData);
    var request = { method: append ? "POST" : "PUT", url: url("resultData"), body: String(resultData), persist: true };
    request.onFinalStatus = tooLargeOverlay("Couldn't send result data: too large!");
    return enqueue(request, onSuccess, onError);
  }

  function tooLargeOverlay(text) {
    return function (status) {
      if (status === 413) jatos.showOverlay({ text: text, id: "result413", timeout: 8000, showImg: false });
    };
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
    var request = { method: "POST", url: url("files/" + encodeURI(filename)), blob: blob, filename: filename };
    request.onFinalStatus = tooLargeOverlay("Couldn't send result file: too large!");
    return enqueue(request, onSuccess, onError);
  };

  function readDownload(response) {
    var type = (response.headers.get("Content-Type") || "").split(";")[0].trim();
    if (type === "application/json") return response.text().then(JSON.parse);
    if (type === "text/plain") return response.text();
    return response.blob();
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
    return settled(function (resolve, reject) {
      whenIdle().then(function () {
        return fetch(target, { credentials: "same-origin", cache: "no-store" });
      }).then(function (response) {
        if (response.status !== 200) throw new Error(response.statusText || String(response.status));
        return readDownload(response);
      }).then(function (result) {
        call(onSuccess, result);
        resolve(result);
      }, function (error) {
        var message = "Download of " + filename + " returned " + (error && error.message);
        call(onError, message);
        reject(message);
      });
    });
  };

  jatos.setStudySessionData = function (studySessionData, onSuccess, onError) {
    jatos.studySessionData = studySessionData;
    return enqueue({ method: "POST", url: url("../studySessionData"), body: JSON.stringify(studySessionData),
                     persist: true }, onSuccess, onError);
  };

  jatos.log = function (message) {
    return enqueue({ method: "POST", url: url("log"), body: String(message), persist: true });
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

  // ---------------------------------------------------------------------------
  // Channel transport: the WebSocket surface (readyState, send, close, on*) over HTTP.
  // One long-poll per page carries the events of all its channels.
  // ---------------------------------------------------------------------------

  var CONNECTING = 0, OPEN = 1, CLOSED = 3;
  var pageId = randomId();
  var pollSockets = {};
  var pollAbort = null;
  var polling = false;

  function postJson(target, body) {
    return fetch(target, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {})
    });
  }

  function PollingSocket(openPath) {
    var socket = this;
    socket.readyState = CONNECTING;
    socket.pending = [];
    socket.sequence = 0;
    socket.sending = false;
    postJson(url(openPath), { openId: randomId() }).then(function (response) {
      if (response.status !== 200) throw new Error(response.status + " " + response.statusText);
      return response.json();
    }).then(function (opened) {
      if (socket.readyState === CLOSED) return;
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

  PollingSocket.prototype.base = function () {
    return url("../channels/" + this.conn + "/");
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
        else if (response.status === 410 || response.status === 404) socket.lost();
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
        if (response.status === 410 || response.status === 404) return socket.lost();
        if (response.status !== 200) throw new Error(String(response.status));
        socket.sending = false;
        socket.flush();
      }).catch(function () {
        failures++;
        setTimeout(attemptSend, Math.min(250 * Math.pow(2, failures), 5000));
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
      fetch(this.base() + "close", { method: "POST", credentials: "same-origin", keepalive: true })
        .catch(function () {});
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
      pollFailures++;
      setTimeout(pollLoop, Math.min(500 * Math.pow(2, pollFailures - 1), 5000));
    });
  }
  var pollFailures = 0;
  var pollNumber = 0;

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
      if (navigator.sendBeacon) navigator.sendBeacon(url("../channels/" + conn + "/close"));
    });
  });

  // ---------------------------------------------------------------------------
  // JSON Pointer (RFC 6901) and JSON Patch (RFC 6902) for the local session copies.
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

  // ---------------------------------------------------------------------------
  // Batch and group sessions: the same API over two channels with different key names.
  // ---------------------------------------------------------------------------

  function SharedSession(channelName, words) {
    this.channelName = channelName;
    this.words = words;
    this.data = {};
    this.version = null;
    this.counter = 0;
    this.waiting = {};
    this.sending = null;
    this.socket = null;
    this.context = {};
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

  function applyPatchesSafely(document, patches) {
    try {
      return applyPatches(document, patches);
    } catch (error) {
      console.error("jatos.js: couldn't apply session patch", error);
      return document;
    }
  }

  SharedSession.prototype.settle = function (message) {
    var waiter = this.waiting[message[this.words.id]];
    if (!waiter) return;
    if (message.action === "SESSION_ACK") waiter.succeed("success");
    else waiter.fail(this.channelName + " session update failed");
  };

  SharedSession.prototype.versioning = function () {
    return this.channelName === "Batch" ? jatos.batchSessionVersioning : jatos.groupSessionVersioning;
  };

  SharedSession.prototype.send = function (patches, onSuccess, onFail) {
    var session = this, words = this.words;
    var description = this.channelName + " session patch";
    // Refusals are logged like JATOS does (studies with catchAndLogErrors send them to the server log).
    if (!session.socket || session.socket.readyState !== OPEN) {
      return rejected("Can't send " + description.toLowerCase() + ". No open " + this.channelName.toLowerCase() +
        " channel.", onFail, console.error);
    }
    if (session.versioning() && session.sending) {
      return rejected("Can send only one " + description.toLowerCase() + " at a time.", onFail, console.error);
    }
    if (studyRunInvalid) {
      return rejected("Can't send " + description.toLowerCase() + ". This study run is invalid.", onFail, console.warn);
    }
    var actionId = session.counter++;
    var message = { action: "SESSION" };
    message[words.id] = actionId;
    message[words.patches] = Array.isArray(patches) ? patches : [patches];
    message[words.version] = session.version;
    message[words.versioning] = !!session.versioning();
    var promise = settled(function (resolve, reject) {
      var timer = setTimeout(function () { finish(reject, onFail, "Timeout sending session patch"); },
        jatos.channelSendingTimeoutTime);
      function finish(settle, callback, result) {
        clearTimeout(timer);
        delete session.waiting[actionId];
        if (session.sending === promise) session.sending = null;
        call(callback, result);
        settle(result);
      }
      session.waiting[actionId] = {
        succeed: function (result) { finish(resolve, onSuccess, result); },
        fail: function (result) { finish(reject, onFail, result); }
      };
    });
    if (session.versioning()) session.sending = promise;
    session.socket.send(JSON.stringify(message));
    return promise;
  };

  function patch(op, path, value, from) {
    var operation = { op: op, path: path };
    if (value !== undefined) operation.value = value;
    if (from !== undefined) operation.from = from;
    return operation;
  }

  function sessionApi(session) {
    var api = {};
    api.get = function (name) { return clone(getByPointer(session.data, "/" + name)); };
    api.getAll = function () { return clone(session.data); };
    api.find = function (path) { return clone(getByPointer(session.data, path)); };
    api.test = function (path, value) { return getByPointer(session.data, path) === value; };
    api.defined = function (path) { return getByPointer(session.data, path) !== undefined; };
    api.add = function (path, value, onSuccess, onFail) { return session.send(patch("add", path, value), onSuccess, onFail); };
    api.set = function (name, value, onSuccess, onFail) { return api.add("/" + name, value, onSuccess, onFail); };
    api.setAll = function (value, onSuccess, onFail) { return api.replace("", value, onSuccess, onFail); };
    api.remove = function (path, onSuccess, onFail) { return session.send(patch("remove", path), onSuccess, onFail); };
    api.clear = function (onSuccess, onFail) { return session.send(patch("remove", "/"), onSuccess, onFail); };
    api.replace = function (path, value, onSuccess, onFail) { return session.send(patch("replace", path, value), onSuccess, onFail); };
    api.copy = function (from, path, onSuccess, onFail) { return session.send(patch("copy", path, undefined, from), onSuccess, onFail); };
    api.move = function (from, path, onSuccess, onFail) { return session.send(patch("move", path, undefined, from), onSuccess, onFail); };
    return api;
  }

  var batchSession = new SharedSession("Batch", { id: "id", patches: "patches", data: "data", version: "version",
                                                  versioning: "versioning" });
  var groupSession = new SharedSession("Group", { id: "sessionActionId", patches: "sessionPatches", data: "sessionData",
                                                  version: "sessionVersion", versioning: "sessionVersioning" });
  jatos.batchSession = sessionApi(batchSession);
  jatos.groupSession = sessionApi(groupSession);
  jatos.batchSessionVersioning = true;
  jatos.groupSessionVersioning = true;

  // ---------------------------------------------------------------------------
  // Channel life: heartbeat, watchdog, reopening with backoff (channels.md §5).
  // ---------------------------------------------------------------------------

  function ChannelKeeper(name, onDead, onClosed) {
    this.name = name;
    this.onDead = onDead;
    this.onClosed = onClosed;
    this.heartbeatTimer = null;
    this.heartbeatTimeouts = [];
    this.watchdog = null;
  }

  ChannelKeeper.prototype.start = function (socket) {
    var keeper = this;
    keeper.stopHeartbeat();
    keeper.heartbeatTimer = setInterval(function () {
      if (socket.readyState !== OPEN) return;
      socket.send('{"heartbeat":"ping"}');
      keeper.heartbeatTimeouts.push(setTimeout(function () { keeper.onDead(); }, jatos.channelHeartbeatTimeoutTime));
    }, jatos.channelHeartbeatInterval);
    clearInterval(keeper.watchdog);
    keeper.watchdog = setInterval(function () {
      if (socket.readyState === CLOSED) {
        clearInterval(keeper.watchdog);
        keeper.onClosed();
      }
    }, jatos.channelClosedCheckInterval);
  };

  ChannelKeeper.prototype.pong = function () {
    this.heartbeatTimeouts.splice(0).forEach(clearTimeout);
  };

  ChannelKeeper.prototype.stopHeartbeat = function () {
    clearInterval(this.heartbeatTimer);
    this.pong();
  };

  ChannelKeeper.prototype.stop = function () {
    this.stopHeartbeat();
    clearInterval(this.watchdog);
  };

  function channelsMayOpen() {
    if (endingStudy || startingComponent) return "study is about to move to the next component or finish";
    if (studyRunInvalid) return "this study run is invalid";
    return null;
  }

  function closeChannels() {
    batchKeeper.stop();
    groupKeeper.stop();
    [batchSession.socket, groupSession.socket].forEach(function (socket) { if (socket) socket.close(); });
  }

  // --- batch channel ---

  var batchAlive = false;
  var batchOpening = null;
  var onBatchSessionCallback = null;
  var batchKeeper = new ChannelKeeper("batch", function () {
    if (batchAlive) {
      batchAlive = false;
      window.dispatchEvent(new Event("batchChannelDead"));
    }
    reopenBatchChannel();
  }, reopenBatchChannel);

  function openBatchChannel() {
    var refusal = channelsMayOpen();
    if (refusal) return Promise.reject(refusal);
    if (batchOpening) return Promise.reject("Can open only one batch channel.");
    batchOpening = new Promise(function (resolve, reject) {
      var socket = new PollingSocket("../batch/open");
      batchSession.socket = socket;
      socket.onopen = function () { batchKeeper.start(socket); };
      socket.onmessage = function (event) { handleBatchMessage(JSON.parse(event.data), resolve); };
      socket.onerror = function () { reject("Batch channel error"); };
      socket.onclose = function () {
        batchSession.reset();
        batchKeeper.stopHeartbeat();
        reject("Batch channel closed");
      };
    });
    var opening = batchOpening;
    opening.then(function () { batchOpening = null; }, function () { batchOpening = null; });
    return opening;
  }

  function openBatchChannelWithRetry(backoff) {
    if (typeof backoff !== "number") backoff = jatos.channelOpeningBackoffTimeMin;
    return openBatchChannel().catch(function (reason) {
      if (backoff < jatos.channelOpeningBackoffTimeMax) backoff *= 2;
      if (!channelsMayOpen()) setTimeout(function () { openBatchChannelWithRetry(backoff); }, backoff);
      throw reason;
    });
  }

  function reopenBatchChannel() {
    if (batchOpening) return;
    if (batchSession.socket) batchSession.socket.close();
    batchSession.reset();
    openBatchChannelWithRetry().catch(function () {});
  }

  function handleBatchMessage(message, opened) {
    if (message.heartbeat === "pong") {
      batchKeeper.pong();
      if (!batchAlive) {
        batchAlive = true;
        window.dispatchEvent(new Event("batchChannelAlive"));
      }
      return;
    }
    batchSession.absorb(message);
    if (message.version !== undefined) opened();
    if (message.action === "SESSION") {
      (message.patches || []).forEach(function (operation) { call(onBatchSessionCallback, operation.path, operation.op); });
    } else if (message.action === "SESSION_ACK" || message.action === "SESSION_FAIL") {
      batchSession.settle(message);
    } else if (message.action === "CLOSED") {
      batchKeeper.stop();
      studyRunInvalid = true;
      jatos.showOverlay({ text: "This study run is invalid.", showImg: false });
    } else if (message.action === "ERROR") {
      console.error(message.errorMsg);
    }
  }

  jatos.onBatchSession = function (callback) { onBatchSessionCallback = callback; };
  jatos.onConnected = function (callback) { window.addEventListener("batchChannelAlive", callback); };
  jatos.onDisconnected = function (callback) { window.addEventListener("batchChannelDead", callback); };
  jatos.isConnected = function () { return batchAlive; };

  // --- group channel ---

  var groupCallbacks = {};
  var groupJoining = null, groupLeaving = false, groupReassigning = false, groupFixing = null;
  var onOwnGroupOpened = null;  // set while a reassignment waits for its new group's OPENED
  var groupKeeper = new ChannelKeeper("group", function () {
    call(groupCallbacks.onError, "Group channel heartbeat fail");
    reopenGroupChannel();
  }, function () {
    call(groupCallbacks.onError, "Group channel closed");
    reopenGroupChannel();
  });

  function clearGroupVariables() {
    jatos.groupMemberId = null;
    jatos.groupResultId = null;
    jatos.groupMembers = [];
    jatos.groupChannels = [];
    groupSession.reset();
  }

  function openGroupChannel() {
    var refusal = channelsMayOpen();
    if (refusal) return Promise.reject("Can't join group: " + refusal);
    if (groupSession.socket && groupSession.socket.readyState !== CLOSED) {
      return Promise.reject("Can't join group: a group channel is already open");
    }
    if (groupJoining) return Promise.reject("Can't join group: joining already");
    groupJoining = new Promise(function (resolve, reject) {
      var socket = new PollingSocket("../group/join");
      groupSession.socket = socket;
      socket.onopen = function () { groupKeeper.start(socket); };
      socket.onmessage = function (event) { handleGroupMessage(JSON.parse(event.data), resolve); };
      socket.onerror = function () { reject("Couldn't join group"); };
      socket.onclose = function () {
        groupKeeper.stopHeartbeat();
        clearGroupVariables();
        call(groupCallbacks.onClose);
        reject("Group channel closed");
      };
    });
    var joining = groupJoining;
    joining.then(function () { groupJoining = null; }, function () { groupJoining = null; });
    return joining;
  }

  function reopenGroupChannel(backoff) {
    if (groupJoining || groupLeaving || groupReassigning || channelsMayOpen()) return;
    if (typeof backoff !== "number") backoff = jatos.channelOpeningBackoffTimeMin;
    if (groupSession.socket) groupSession.socket.close();
    openGroupChannel().catch(function () {
      if (backoff < jatos.channelOpeningBackoffTimeMax) backoff *= 2;
      setTimeout(function () { reopenGroupChannel(backoff); }, backoff);
    });
  }

  function handleGroupMessage(message, opened) {
    if (message.heartbeat !== undefined) return groupKeeper.pong();
    if (message.groupResultId !== undefined) {
      jatos.groupResultId = message.groupResultId;
      jatos.groupMemberId = jatos.studyResultId;
    }
    if (message.members !== undefined) jatos.groupMembers = message.members;
    if (message.channels !== undefined) jatos.groupChannels = message.channels;
    groupSession.absorb(message);
    if (message.sessionVersion !== undefined) opened();
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
        else if (message.memberId === undefined) groupKeeper.stop();
        break;
      case "JOINED":
        if (!self) memberEvent(groupCallbacks.onMemberJoin, message.memberId);
        break;
      case "LEFT":
        if (!self) memberEvent(groupCallbacks.onMemberLeave, message.memberId);
        break;
      case "SESSION":
        (message.sessionPatches || []).forEach(function (operation) {
          call(groupCallbacks.onGroupSession, operation.path, operation.op);
        });
        call(groupCallbacks.onUpdate);
        break;
      case "FIXED":
        if (groupFixing) groupFixing("success");
        call(groupCallbacks.onUpdate);
        break;
      case "SESSION_ACK":
      case "SESSION_FAIL":
        groupSession.settle(message);
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

  jatos.joinGroup = function (callbacks) {
    groupCallbacks = callbacks || {};
    return withDeferredMethods(openGroupChannel().catch(function (reason) {
      call(groupCallbacks.onError, reason);
      throw reason;
    }));
  };

  function groupChannelOpen() {
    return !!groupSession.socket && groupSession.socket.readyState === OPEN;
  }

  jatos.sendGroupMsg = function (msg) {
    if (groupChannelOpen()) groupSession.socket.send(JSON.stringify({ msg: msg }));
  };

  jatos.sendGroupMsgTo = function (recipient, msg) {
    if (groupChannelOpen()) groupSession.socket.send(JSON.stringify({ recipient: recipient, msg: msg }));
  };

  jatos.setGroupFixed = function (onSuccess, onFail) {
    if (!groupChannelOpen()) return rejected("Can't fix group. No open group channel.", onFail);
    if (groupFixing) return rejected("Can fix group only once.", onFail);
    if (studyRunInvalid) return rejected("Can't fix group. This study run is invalid.", onFail);
    var promise = settled(function (resolve, reject) {
      var timer = setTimeout(function () {
        groupFixing = null;
        call(onFail, "Timeout sending message");
        reject("Timeout sending message");
      }, jatos.channelSendingTimeoutTime);
      groupFixing = function (result) {
        clearTimeout(timer);
        groupFixing = null;
        call(onSuccess, result);
        resolve(result);
      };
    });
    groupSession.socket.send(JSON.stringify({ action: "FIXED" }));
    return promise;
  };

  function groupRequest(path, retries) {
    var failures = 0;
    function tryOnce() {
      var controller = new AbortController();
      var timer = setTimeout(function () { controller.abort(); }, jatos.httpTimeout);
      return fetch(url(path), { credentials: "same-origin", cache: "no-store", signal: controller.signal })
        .then(function (response) {
          clearTimeout(timer);
          return response;
        }, function (error) {
          clearTimeout(timer);
          if (failures++ < retries) return sleep(jatos.httpRetryWait).then(tryOnce);
          throw error;
        });
    }
    return tryOnce();
  }

  jatos.reassignGroup = function (onSuccess, onFail) {
    if (groupJoining) return rejected("Can't reassign a group if not joined yet.", onFail);
    if (groupLeaving) return rejected("Can't reassign a group during leaving.", onFail);
    if (groupReassigning) return rejected("Can't reassign a group twice at the same time.", onFail);
    if (!groupChannelOpen()) return rejected("Can't reassign group. Group channel not open.", onFail);
    if (studyRunInvalid) return rejected("Can't reassign group. This study run is invalid.", onFail);
    groupReassigning = true;
    var oldGroup = jatos.groupResultId;
    return settled(function (resolve, reject) {
      groupRequest("../group/reassign", 0).then(function (response) {
        if (response.status === 200) {
          // Beyond JATOS: succeed once the channel has brought the new group (its OPENED), so
          // jatos.groupResultId and jatos.groupMembers are the new group's in the callbacks.
          return newGroupOpened(oldGroup).then(function () {
            groupReassigning = false;
            call(onSuccess);
            resolve();
          });
        }
        groupReassigning = false;
        var reason = response.status === 204 ? undefined : "Reassign answered " + response.status;
        call(onFail, reason);
        reject(reason);
      }, function (error) {
        groupReassigning = false;
        call(onFail, String(error));
        reject(String(error));
      });
    });
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
    if (groupJoining) return rejected("Can't leave group if not joined yet.", onError);
    if (groupReassigning) return rejected("Can't leave group during reassigning.", onError);
    if (groupLeaving) return rejected("Can leave only once.", onError);
    if (studyRunInvalid) return rejected("Can't leave group. This study run is invalid.", onError);
    groupLeaving = true;
    return settled(function (resolve, reject) {
      groupRequest("../group/leave", jatos.httpRetry).then(function (response) {
        groupLeaving = false;
        if (response.status !== 200) throw new Error("Leave answered " + response.status);
        groupKeeper.stop();
        // The server has closed the conn already; close it here too, before the callbacks.
        if (groupSession.socket) groupSession.socket.lost();
        call(onSuccess);
        resolve();
      }).catch(function (error) {
        groupLeaving = false;
        call(onError, String(error));
        reject(String(error));
      });
    });
  };

  jatos.hasJoinedGroup = function () { return jatos.groupResultId !== null; };
  jatos.hasOpenGroupChannel = function () { return groupChannelOpen(); };
  jatos.isMaxActiveMemberReached = function () {
    var max = jatos.batchProperties && jatos.batchProperties.maxActiveMembers;
    return max !== null && max !== undefined && jatos.groupMembers.length >= max;
  };
  jatos.isMaxActiveMemberOpen = function () {
    var max = jatos.batchProperties && jatos.batchProperties.maxActiveMembers;
    return max !== null && max !== undefined && jatos.groupChannels.length >= max;
  };
  jatos.isGroupOpen = function () {
    return groupChannelOpen() && jatos.groupMembers.length === jatos.groupChannels.length;
  };

  // ---------------------------------------------------------------------------
  // Moving on: other components, end and abort.
  // ---------------------------------------------------------------------------

  // Navigate once every queued request is acknowledged, with the "Sending data" overlay
  // if that takes longer than a second.
  function leaveWhenSent(target) {
    var overlay = setTimeout(function () { jatos.showOverlay(jatos.waitSendDataOverlayConfig); }, 1000);
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

  function errorCallback(param3, param4) {
    return typeof param3 === "function" ? param3 : (typeof param4 === "function" ? param4 : undefined);
  }

  jatos.startComponentByPos = function (componentPos, resultData, param3, param4) {
    var component = jatos.componentList[componentPos - 1];
    if (!component) return call(errorCallback(param3, param4), "Component position does not exist");
    jatos.startComponent(component.uuid, resultData, param3, param4);
  };

  jatos.startComponentByTitle = function (title, resultData, param3, param4) {
    var component = jatos.componentList.filter(function (c) { return c.title === title; })[0];
    if (!component) return call(errorCallback(param3, param4), "Component with title " + title + " does not exist");
    jatos.startComponent(component.uuid, resultData, param3, param4);
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

  function finishWithoutRedirect(target, onSuccess, onError) {
    if (endingStudy) return rejected("Can end/abort study only once.", onError);
    endingStudy = true;
    allowLeaving();
    var overlay = setTimeout(function () { jatos.showOverlay(jatos.waitSendDataOverlayConfig); }, 1000);
    var done = enqueue({ method: "GET", url: target }, onSuccess, onError);
    done.then(stopBackgroundWork, function () {}).then(function () {
      clearTimeout(overlay);
      jatos.removeOverlays();
    });
    return done;
  }

  jatos.endStudyWithoutRedirect = function () {
    var a = endArguments(arguments);
    if (a.resultData && !endingStudy) jatos.appendResultData(a.resultData);
    return finishWithoutRedirect(endUrl(a.successful, a.message), a.rest[0], a.rest[1]);
  };
  jatos.endStudyAjax = jatos.endStudyWithoutRedirect;

  jatos.endStudyAndRedirect = function (target) {
    return jatos.endStudyWithoutRedirect.apply(null, Array.prototype.slice.call(arguments, 1)).done(function () {
      window.location.href = target;
    });
  };

  jatos.endStudy = function () {
    var a = endArguments(arguments);
    var showEndPage = a.rest[0];
    if ((typeof showEndPage !== "undefined" && !showEndPage) || inJatosFrame()) {
      var args = a.resultData ? [a.resultData, a.successful, a.message] : [a.successful, a.message];
      var ended = jatos.endStudyWithoutRedirect.apply(null, args);
      if (inJatosFrame()) ended.done(function () { parent.onIframeComplete(jatos.frameId, jatos.studyId); });
      return ended;
    }
    if (endingStudy) return console.warn("Can end/abort study only once");
    endingStudy = true;
    if (a.resultData) jatos.appendResultData(a.resultData);
    leaveWhenSent(endUrl(a.successful, a.message));
  };

  jatos.abortStudyWithoutRedirect = function (message, onSuccess, onError) {
    return finishWithoutRedirect(abortUrl(message), onSuccess, onError);
  };
  jatos.abortStudyAjax = jatos.abortStudyWithoutRedirect;

  jatos.abortStudyAndRedirect = function (target, message, onSuccess, onError) {
    return jatos.abortStudyWithoutRedirect(message, onSuccess, onError).done(function () {
      window.location.href = target;
    });
  };

  jatos.abortStudy = function (message, showEndPage) {
    if (showEndPage === false || inJatosFrame()) {
      var aborted = jatos.abortStudyWithoutRedirect(message);
      if (inJatosFrame()) aborted.done(function () { parent.onIframeComplete(jatos.frameId, jatos.studyId); });
      return aborted;
    }
    if (endingStudy) return console.warn("Can end/abort study only once");
    endingStudy = true;
    leaveWhenSent(abortUrl(message));
  };

  // ---------------------------------------------------------------------------
  // Page furniture: overlays, abort button, the reload warning.
  // ---------------------------------------------------------------------------

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
