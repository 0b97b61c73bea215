// The API docs page (/docs): Swagger UI on the server's own OpenAPI document. A file rather than an
// inline script, so the page's Content-Security-Policy allows scripts from this origin only.
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });
