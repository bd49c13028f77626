// The error pages' "Back to the previous page" button (a javascript: link would need the CSP to
// allow inline script). Hidden until this script runs, and only shown when there is a page to go
// back to, so no button does nothing.
(function () {
  "use strict";
  for (const button of document.querySelectorAll("[data-history-back]")) {
    if (window.history.length < 2) continue;
    button.hidden = false;
    button.addEventListener("click", () => window.history.back());
  }
})();
