// Tables that sort, filter and page in the browser, for lists the server sends whole (the
// consortium's institutions, a report's rows). Progressive: without JavaScript the table is
// simply all there. Mark a table with:
//   class="sortable"        each column header becomes a button; aria-sort tells the order
//   data-filter="Label"     a labelled text box above it keeps the rows that contain the text
//   data-page-size="25"     rows shown per page, with Previous/Next below it
(function () {
  "use strict";

  function cellValue(row, index) {
    const cell = row.cells[index];
    if (!cell) return "";
    const text = (cell.dataset.sort || cell.textContent).trim();
    const number = Number(text.replace(/[, ]/g, ""));
    return text !== "" && !Number.isNaN(number) ? number : text.toLowerCase();
  }

  function enhance(table) {
    const body = table.tBodies[0];
    if (!body) return;
    const rows = Array.from(body.rows).filter((r) => !r.querySelector("td[colspan]"));
    const pageSize = Number(table.dataset.pageSize || 0);
    let page = 0;
    let filter = "";
    let pager = null;

    function visibleRows() {
      return rows.filter((r) => !filter || r.textContent.toLowerCase().includes(filter));
    }

    function redraw() {
      const shown = visibleRows();
      const pages = pageSize ? Math.max(1, Math.ceil(shown.length / pageSize)) : 1;
      page = Math.min(page, pages - 1);
      for (const r of rows) r.hidden = true;
      shown.forEach((r, i) => {
        r.hidden = pageSize ? Math.floor(i / pageSize) !== page : false;
        body.appendChild(r); // keeps the sorted order in the DOM
      });
      if (pager) {
        pager.querySelector("[data-role=status]").textContent =
          `Page ${page + 1} of ${pages} (${shown.length} row${shown.length === 1 ? "" : "s"})`;
        pager.querySelector("[data-role=prev]").disabled = page === 0;
        pager.querySelector("[data-role=next]").disabled = page >= pages - 1;
      }
    }

    if (table.classList.contains("sortable") && table.tHead) {
      const headers = Array.from(table.tHead.rows[0].cells);
      headers.forEach((th, index) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "sort";
        button.textContent = th.textContent;
        th.replaceChildren(button);
        button.addEventListener("click", () => {
          const ascending = th.getAttribute("aria-sort") !== "ascending";
          headers.forEach((h) => h.removeAttribute("aria-sort"));
          th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
          rows.sort((a, b) => {
            const x = cellValue(a, index);
            const y = cellValue(b, index);
            const order = x < y ? -1 : x > y ? 1 : 0;
            return ascending ? order : -order;
          });
          redraw();
        });
      });
    }

    if (table.dataset.filter !== undefined) {
      const id = `${table.id || "table"}-filter`;
      const wrap = document.createElement("p");
      wrap.className = "table-filter";
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = table.dataset.filter || "Filter";
      const input = document.createElement("input");
      input.type = "search";
      input.id = id;
      input.addEventListener("input", () => {
        filter = input.value.trim().toLowerCase();
        page = 0;
        redraw();
      });
      wrap.append(label, " ", input);
      table.before(wrap);
    }

    if (pageSize && rows.length > pageSize) {
      pager = document.createElement("nav");
      pager.className = "pagination";
      pager.setAttribute("aria-label", "Table pages");
      pager.innerHTML =
        '<button type="button" data-role="prev">Previous</button> ' +
        '<span data-role="status" aria-live="polite"></span> ' +
        '<button type="button" data-role="next">Next</button>';
      pager.querySelector("[data-role=prev]").addEventListener("click", () => { page -= 1; redraw(); });
      pager.querySelector("[data-role=next]").addEventListener("click", () => { page += 1; redraw(); });
      table.after(pager);
    }
    redraw();
  }

  document.querySelectorAll("table.sortable, table[data-filter], table[data-page-size]").forEach(enhance);
})();
