// The officer app's service worker: the app shell from the cache when the network is
// gone (the app then waits for the link to publish again); everything else passes by.
const CACHE = "tianwang-officer-1";
const SHELL = ["/officer", "officer.js", "officer.webmanifest", "officer-icon.svg"];

self.addEventListener("install", (e) => {
  e.waitUntil(caches.open(CACHE).then((c) => c.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("fetch", (e) => {
  const url = new URL(e.request.url);
  if (e.request.method !== "GET" || !SHELL.some((p) => url.pathname.endsWith(p))) return;
  e.respondWith(fetch(e.request).then((res) => {
    const copy = res.clone();
    caches.open(CACHE).then((c) => c.put(e.request, copy));
    return res;
  }).catch(() => caches.match(e.request)));
});
