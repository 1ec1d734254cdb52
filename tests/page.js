// Opens the example's page as a browser does: jsdom parses the page as the
// server sends it and runs its script, whose fetch is Node's, against the
// real server. Prints what the page shows as a JSON line every 100 ms.
// Usage: node page.js URL (with jsdom on NODE_PATH).
"use strict";
const { JSDOM } = require("jsdom");

const url = process.argv[2];

async function main() {
  const html = await (await fetch(url)).text();
  const dom = new JSDOM(html, {
    url,
    runScripts: "dangerously",
    pretendToBeVisual: true,
    beforeParse(window) {
      // A browser's fetch fails with a TypeError of the page's own realm.
      window.fetch = async (input, init) => {
        try {
          return await fetch(new URL(input, url), init);
        } catch (error) {
          throw new window.TypeError(error.message);
        }
      };
    },
  });
  const page = dom.window.document;
  setInterval(() => {
    const offline = page.getElementById("offline");
    const statuses = [...page.querySelectorAll("#analyses .status")];
    const details = [...page.querySelectorAll("#analyses .result")];
    console.log(JSON.stringify({
      offline: offline.hidden ? null : offline.textContent,
      statuses: statuses.map((status) => status.textContent),
      details: details.map((detail) => detail.textContent),
    }));
  }, 100);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
